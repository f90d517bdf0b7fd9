"""The ``pmgd`` command line.

``pmgd train`` trains one job on the in-process engine, from flags or a config file (JSON
or TOML; flags override the file), with a progress bar and a summary table, and optionally
writes the summary as JSON. Every job-config field is a flag: ``--tau-theta 4``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing

from pmgd_node.config import CHOICES, FIELD_HELP, ConfigError, JobConfig, read_mapping
from pmgd_node.shell import keys as cluster_keys

# What an empty default means, where printing the value itself would say nothing.
_DEFAULT_MEANS = {
    "network": "the task's reference network: 2-2-1, 3-3-1, …, cnn-fmnist, cnn-cifar10",
    "init_scale": "none, the model's reference init (MLP ±0.5)",
    "data_dir": "the current directory",
    "model": "none, the task's built-in network",
    "chip": "none, forward passes in-process",
}

_METAVARS = {"task": "NAME", "network": "SPEC", "data_dir": "DIR"}

_FILE_ONLY = ("node_links",)  # nested settings: config files only


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default once: "(default: …)" is appended only where the help text
    does not state the default already and the default is a value (not None, "" or [], which
    mean "unset", nor the True/False of a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or isinstance(action.default, bool) or action.default in ("", [])
        if "default" in text or unset or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def shown_default(name: str, value) -> str:
    """A job-config default as ``pmgd train --help`` prints it."""
    if name in _DEFAULT_MEANS and not value:
        return _DEFAULT_MEANS[name]
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per job-config field. Its parser default is SUPPRESS, so an unset flag is
    absent from the namespace and never overrides a config file; the help shows the real
    default, taken from JobConfig."""
    hints = typing.get_type_hints(JobConfig)
    for f in dataclasses.fields(JobConfig):
        if f.name in _FILE_ONLY:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = FIELD_HELP.get(f.name, "see pmgd_node/config.py") + f" (default: {shown_default(f.name, default)})"
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if f.name == "fm_band":
            kwargs.update(nargs=2, type=float, metavar=("F_MIN", "F_MAX"))
        elif hint is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif hint == float | None:
            kwargs.update(type=_optional_float, metavar="X|none")
        elif hint is int:
            kwargs.update(type=int, metavar="N")
        elif hint is float:
            kwargs.update(type=float, metavar="X")
        elif f.name in CHOICES:
            kwargs.update(metavar="{" + ",".join(CHOICES[f.name]) + "}")
        else:
            kwargs.update(metavar=_METAVARS.get(f.name, "TEXT"))
        parser.add_argument(flag, **kwargs)


def config_fields(args: argparse.Namespace) -> dict:
    """The job-config fields the user set: the config file's, overridden by the flags given.

    Fields left unset stay absent, so that whoever runs the job can tell "not set" from a
    value (a cluster fills in ``nodes`` from the nodes it has)."""
    fields = dict(_read_fields(args.config)) if args.config else {}
    for f in dataclasses.fields(JobConfig):
        if hasattr(args, f.name):
            fields[f.name] = getattr(args, f.name)
    where, _, name = str(fields.get("model") or "").rpartition(":")
    if where.endswith(".py"):  # the job may run in other processes (a cluster's): name the file from /
        fields["model"] = f"{os.path.abspath(where)}:{name}"
    return fields


def _read_fields(path: str) -> dict:
    fields = read_mapping(path)
    JobConfig.from_dict(fields)  # the file alone must be a valid job: its errors name it, not a flag
    return fields


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmgd", description="Parameter-multiplexed gradient descent")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one job (all its seeds) and print a summary",
                           formatter_class=HelpFormatter)
    train.add_argument("--config", metavar="FILE", help="JSON or TOML file of job-config fields (flags override it)")
    train.add_argument("--engine", choices=["local", "cluster"], default="local",
                       help="local: the in-process engine; cluster: broadcaster and node processes over ZeroMQ")
    train.add_argument("--cluster", default="", metavar="ENDPOINT",
                       help="control endpoint of a running broadcaster (pmgd up); default: start a local cluster")
    train.add_argument("--keys", default=os.environ.get("PMGD_KEYS", ""), metavar="DIR",
                       help="the running cluster's key directory, or a keyed chip's on the local engine "
                            "(default: $PMGD_KEYS; see pmgd keys)")
    train.add_argument("--key-name", default=os.environ.get("PMGD_KEY_NAME", "client"), metavar="NAME",
                       help="our key pair in it (default: $PMGD_KEY_NAME or client)")
    train.add_argument("--device", default=None, metavar="NAME",
                       help="torch device for the CNN models (default: cuda if available)")
    train.add_argument("--json", dest="json_path", metavar="PATH", help="also write the summary as JSON")
    train.add_argument("--workers", type=int, default=1, metavar="N",
                       help="split the seeds into N contiguous slices run by N worker processes (local engine; "
                            "the same results as one process)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(train)
    study = sub.add_parser("study", help="run a study sweep into CSV, JSON and figures (resumable)",
                           formatter_class=HelpFormatter)
    study.add_argument("name", help="fig2, fig4, fig5, table1, latency, jitter, drop, drift, noise, cnn or transfer")
    study.add_argument("--out", required=True, metavar="DIR",
                       help="output folder (an interrupted study resumes from it)")
    study.add_argument("--config", metavar="FILE",
                       help="JSON or TOML file of study parameters, or a study.json to repeat a study exactly "
                            "(flags override it)")
    study.add_argument("--set", dest="overrides", action="append", default=[], metavar="PARAM=VALUE",
                       help="set one study parameter (JSON value), e.g. --set delays=[0,1,2]")
    study.add_argument("--seeds", type=int, metavar="N", help="random initialisations per point (default: the study's)")
    study.add_argument("--engine", choices=["local", "cluster"], default="local",
                       help="local: the in-process engine; cluster: a local cluster of node processes")
    study.add_argument("--cluster-nodes", type=int, default=2, metavar="N", help="node processes of the cluster engine")
    study.add_argument("--workers", type=int, default=None, metavar="N",
                       help="points run at once, in N worker processes with cores/N threads each (1: every point "
                            "in this process; with --scheduler local: the local cluster's workers) "
                            "(default: the machine's cores)")
    study.add_argument("--scheduler", default="", metavar="ADDRESS",
                       help="run the points on a Dask cluster: its scheduler's address (tls://host:port; tcp:// on "
                            "loopback only), or 'local' to start one with --workers worker processes on loopback "
                            "(pip install -e .[distributed]; docs/studies.md)")
    study.add_argument("--scheduler-security", default="", metavar="DIR",
                       help="TLS files for the Dask cluster: DIR/ca.pem, DIR/cert.pem, DIR/key.pem (default: Dask's "
                            "own configuration, distributed.comm.tls)")
    study.add_argument("--point-resources", action="append", default=[], metavar="NAME=N",
                       help="Dask worker resources each point takes, e.g. GPU=1: one point per GPU worker")
    study.add_argument("--quiet", action="store_true", help="no progress bar")
    up = sub.add_parser("up", help="start a local cluster (broadcaster + N nodes) until Ctrl-C",
                        formatter_class=HelpFormatter)
    up.add_argument("--nodes", type=int, default=2, metavar="N", help="parameter-node processes")
    up.add_argument("--state-dir", default="", metavar="DIR", help="broadcaster checkpoints survive restarts here")
    up.add_argument("--log-dir", default="", metavar="DIR", help="write each process's output to DIR/<name>.log")
    up.add_argument("--remote-evaluator", action="store_true",
                    help="run the forward passes in a separate evaluator process (the chip-in-the-loop hop)")
    up.add_argument("--no-api", dest="api", action="store_false", help="do not start the REST API")
    up.add_argument("--db", default="pmgd.sqlite", metavar="FILE", help="the API's SQLite file")
    up.add_argument("--metrics", action="store_true", help="serve Prometheus /metrics from every process")
    up.add_argument("--keys", default=None, metavar="DIR",
                    help="the cluster's key directory, made if it holds none (default: fresh keys in a temporary "
                         "directory, removed at the end)")
    keys = sub.add_parser("keys", help="make and manage the cluster's CurveZMQ keys", formatter_class=HelpFormatter)
    keys.add_argument("action", choices=["init", "add", "revoke", "list"],
                      help="init DIR: server and client keys; add DIR NAME: a new authorized client; "
                           "revoke DIR NAME: refuse it from now on; list DIR: the authorized clients")
    keys.add_argument("dir", metavar="DIR", help="the key directory")
    keys.add_argument("name", nargs="?", default="", metavar="NAME", help="client name (add, revoke)")
    keys.add_argument("--if-missing", action="store_true",
                      help="init: do nothing (exit 0) when DIR already holds keys, e.g. at every container start")
    sub.add_parser("api", help="serve the REST API and the live dashboard", add_help=False)
    sub.add_parser("broadcaster", help="run the cost-broadcaster service", add_help=False)
    sub.add_parser("node", help="run one parameter-node process", add_help=False)
    sub.add_parser("evaluator", help="serve the broadcaster's forward passes (remote evaluator hop)", add_help=False)
    sub.add_parser("jobs", help="control jobs on a running API: submit, ls, show, stop, logs", add_help=False)
    sub.add_parser("curve", help="one long learning curve beside backprop, checkpointed (resumable)", add_help=False)
    return parser


def cmd_train(args: argparse.Namespace, started: float) -> int:
    fields = config_fields(args)
    config = JobConfig.from_dict(fields)  # a bad file or value stops here, before the heavy imports
    keys = None
    if args.engine == "cluster" and args.cluster:
        from services.cluster.client import fit_to_cluster

        keys = cluster_keys.load_optional(args.keys, args.key_name)
        config = JobConfig.from_dict(fit_to_cluster(fields, args.cluster, keys=keys))
    elif args.engine == "local" and config.chip and args.keys:
        keys = cluster_keys.load_optional(args.keys, args.key_name)  # our identity towards a keyed chip
    if args.workers != 1:
        from services.studies.workers import check_workers
        from services.train import check_splittable

        check_workers(args.workers)
        if args.engine != "local":
            raise ConfigError("workers", "splits the seeds of a job on the local engine only", kind="option")
        check_splittable(config)
    from services.train import train_job  # heavy imports (torch) only once a command runs

    summary = train_job(config, device=args.device, progress=not args.quiet, engine=args.engine, cluster=args.cluster,
                        started=started, keys=keys, workers=args.workers)
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    # Every run diverged: nothing was trained, and a script must not take it for a result.
    return 3 if summary.get("diverged") == summary["runs"] else 0


def cmd_study(args: argparse.Namespace) -> int:
    from rich.console import Console

    from services import studies
    from services.studies.sweep import resolve_params, run_study

    study = studies.get(args.name)
    given: dict = {}
    if args.config:
        loaded = _load_mapping(args.config)
        # A finished study's study.json repeats it exactly: its "params" are the parameters.
        given.update(loaded["params"] if "params" in loaded and "study" in loaded else loaded)
    for item in args.overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("set", f"must be PARAM=VALUE; got {item!r}", kind="option")
        given[name.strip().replace("-", "_")] = value
    if args.seeds is not None:
        given["seeds"] = args.seeds
    params = resolve_params(study, given)
    from services.studies.workers import check_workers, cores

    workers = check_workers(cores() if args.workers is None else args.workers)
    resources = {}
    for item in args.point_resources:
        name, _, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = 0.0
        if not name.strip() or not 0 < value < 1e6:
            raise ConfigError("point-resources", f"must be NAME=N with N > 0, e.g. GPU=1; got {item!r}", kind="option")
        resources[name.strip()] = value
    console = Console(stderr=True)
    summary = run_study(study, params, args.out, engine=args.engine, progress=not args.quiet, console=console,
                        cluster_nodes=args.cluster_nodes, workers=workers, scheduler=args.scheduler,
                        scheduler_security=args.scheduler_security, point_resources=resources or None)
    console.print(f"{study.name}: {summary['runs']} runs in {summary['points']} points → {args.out} "
                  f"(runs.csv, summary.json, {', '.join(summary['figures']) or 'no figures'})")
    return 0


def _load_mapping(path: str) -> dict:
    data = read_mapping(path)
    if not isinstance(data, dict):
        raise ConfigError(path, "must hold a mapping of study parameters", kind="config file")
    return data


def cmd_up(args: argparse.Namespace) -> int:
    import signal

    from services.cluster.launcher import LocalCluster

    if args.nodes < 1:
        raise ConfigError("nodes", f"must be an integer ≥ 1; got {args.nodes}", kind="option")
    cluster = LocalCluster(args.nodes, state_dir=args.state_dir, log_dir=args.log_dir,
                           remote_evaluator=args.remote_evaluator, api=args.api, api_db=args.db, metrics=args.metrics,
                           say=lambda text: print(text, flush=True), keys=args.keys)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    # Ctrl-C raises KeyboardInterrupt even while starting: set here, since a shell that starts
    # a command in the background without job control hands it SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cluster.start()
        cluster.wait_ready()
        if cluster.keys_dir:
            print(f"{'keys':>9}  {cluster.keys_dir}  (export PMGD_KEYS={cluster.keys_dir} to reach this cluster)",
                  flush=True)
        for name, endpoint in cluster.endpoints.items():
            print(f"{name:>9}  {endpoint}", flush=True)
        if cluster.api_url:
            print(f"{'api':>9}  {cluster.api_url}  (dashboard {cluster.api_url}/dashboard)", flush=True)
        for name, url in cluster.metrics_urls.items():
            print(f"{'metrics':>9}  {name}: {url}", flush=True)
        print(f"broadcaster pid {cluster.broadcaster.pid}; {args.nodes} node(s) pids "
              f"{', '.join(str(p.pid) for p in cluster.nodes)}", flush=True)
        print(f"submit with: pmgd train --engine cluster --cluster {cluster.endpoints['control']} …"
              + (f"  or  pmgd jobs --api {cluster.api_url} submit CONFIG --engine cluster" if cluster.api_url else "")
              + "  (Ctrl-C stops)", flush=True)
        while not stop and all(p.poll() is None for p in cluster.processes()):
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        print("cluster stopped", flush=True)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """``pmgd keys``: the key directory's life cycle (docs/security.md)."""
    if args.action in ("add", "revoke") and not args.name:
        raise ConfigError("name", f"pmgd keys {args.action} DIR NAME needs the client's name", kind="argument")
    try:
        if args.action == "init":
            if not cluster_keys.init(args.dir, if_missing=args.if_missing):
                print(f"keys already in {args.dir}: left as they are")
                return 0
            print(f"keys made in {args.dir}: give every service PMGD_KEYS={args.dir} (servers need "
                  f"server.key_secret and authorized/; clients server.key and their own pair)")
        elif args.action == "add":
            cluster_keys.add(args.dir, args.name)
            print(f"client {args.name} authorized: {args.dir}/{args.name}.key_secret (use PMGD_KEY_NAME={args.name})")
        elif args.action == "revoke":
            cluster_keys.revoke(args.dir, args.name)
            print(f"client {args.name} revoked: new connections with its key are refused")
        else:
            for name in sorted(os.listdir(os.path.join(args.dir, cluster_keys.AUTHORIZED))):
                if name.endswith(".key"):
                    print(name[:-len(".key")])
    except (ValueError, OSError) as err:
        print(f"pmgd keys: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # the summary's wall time counts from here: what the user waits for
    argv = sys.argv[1:] if argv is None else argv
    # Service commands parse their own flags (their settings objects own them).
    if argv and argv[0] == "broadcaster":
        from services.broadcaster.service import main as broadcaster_main
        return broadcaster_main(argv[1:])
    if argv and argv[0] == "api":
        from services.api.app import main as api_main
        return api_main(argv[1:])
    if argv and argv[0] == "evaluator":
        from services.evaluator.remote import main as evaluator_main
        return evaluator_main(argv[1:])
    if argv and argv[0] == "node":
        from pmgd_node.shell.process import main as node_main
        return node_main(argv[1:])
    if argv and argv[0] == "jobs":
        from services.api.client import main as jobs_main
        return jobs_main(argv[1:])
    if argv and argv[0] == "curve":
        from services.studies.curve import main as curve_main
        return curve_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args, started)
        if args.command == "up":
            return cmd_up(args)
        if args.command == "study":
            return cmd_study(args)
        if args.command == "keys":
            return cmd_keys(args)
    except ConfigError as err:
        parser.exit(2, f"pmgd: error: {err}\n")
    except (FileNotFoundError, RuntimeError, TimeoutError, cluster_keys.KeysError) as err:
        parser.exit(1, f"pmgd: error: {err}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
