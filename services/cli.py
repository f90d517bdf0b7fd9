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
import typing

from pmgd_node.config import ConfigError, JobConfig, read_mapping

_HELP = {
    "task": "parity2..parity12, fmnist, cifar10",
    "network": "MLP spec like 2-2-1 for parity (default: the task's reference network)",
    "perturbation": "tm, cm, rcm or fm",
    "mode": "discrete or analog",
    "integrator": "auto, sum, lowpass or momentum",
    "amplitude": "perturbation amplitude A",
    "eta": "learning rate η",
    "tau_theta": "τ_θ in ticks: update period (discrete) or lowpass time constant (analog)",
    "tau_x": "τ_x in ticks: input-change period",
    "tau_hp": "τ_hp in ticks: high-pass time constant of the analog C̃ extraction",
    "fm_band": "FM band F_MIN F_MAX in cycles per tick",
    "seeds": "number of random initialisations run side by side",
    "max_ticks": "perturbed-tick budget",
    "target_accuracy": "stop at this accuracy ('none' to disable)",
    "target_cost": "stop at this cost ('none' to disable)",
    "data_dir": "directory holding the Fashion-MNIST / CIFAR-10 files",
    "timing": "sync (lock-step) or async (each node on its own clock)",
    "correlation": "tagged (C̃ carries its tick) or untagged (nodes use their current θ̃)",
    "delay": "C̃ broadcast delay to the nodes, ticks",
    "jitter": "extra random C̃ delay, ticks",
    "jitter_dist": "uniform or exponential",
    "drop": "probability a C̃ message to a node is lost",
    "up_delay": "node → broadcaster weights delay, ticks (async)",
    "up_jitter": "extra random weights delay, ticks (async)",
    "up_drop": "probability a weights message is lost (async)",
    "drift": "async: node clock rates uniform in 1 ± drift",
    "tick_period": "cluster τ_p in seconds (0: as fast as possible)",
    "checkpoint_every": "cluster: ticks between θ⁰ checkpoints",
    "compensation": "untagged: correlate C̃ with θ̃[now − compensation] (a known delay; FM phase compensation)",
    "cost_noise": "σ of Gaussian read-out noise on every measured cost",
    "update_noise": "σ of Gaussian noise added to every weight update",
    "device_variation": "σ of the fixed per-parameter perturbation and update gains (1 ± σ)",
}


_FILE_ONLY = ("node_links",)  # nested settings: config files only


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(JobConfig)
    for f in dataclasses.fields(JobConfig):
        if f.name in _FILE_ONLY:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        kwargs: dict = {"dest": f.name, "default": None, "help": _HELP.get(f.name, f.name.replace("_", " "))}
        if f.name == "fm_band":
            kwargs.update(nargs=2, type=float, metavar=("F_MIN", "F_MAX"))
        elif hint in (float | None, typing.Optional[float]):
            kwargs.update(type=_optional_float)
        elif hint is int:
            kwargs.update(type=int)
        elif hint is float:
            kwargs.update(type=float)
        parser.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> JobConfig:
    base = JobConfig.load(args.config).to_dict() if args.config else {}
    for f in dataclasses.fields(JobConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = value
    if "task" in base and "network" not in base:
        base["network"] = ""  # re-derive the task's reference network
    return JobConfig.from_dict(base)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmgd", description="Parameter-multiplexed gradient descent")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one job (all its seeds) and print a summary",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--config", help="JSON or TOML file of job-config fields (flags override it)")
    train.add_argument("--engine", choices=["local", "cluster"], default="local",
                       help="local: the in-process engine; cluster: broadcaster and node processes over ZeroMQ")
    train.add_argument("--cluster", default="", metavar="ENDPOINT",
                       help="control endpoint of a running broadcaster (pmgd up); default: start a local cluster")
    train.add_argument("--device", default=None, help="torch device for the CNN models (default: cuda if available)")
    train.add_argument("--json", dest="json_path", metavar="PATH", help="also write the summary as JSON")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(train)
    study = sub.add_parser("study", help="run a study sweep into CSV, JSON and figures (resumable)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    study.add_argument("name", help="fig2, fig4, fig5, table1, latency, jitter, drop, drift or noise")
    study.add_argument("--out", required=True, help="output folder (an interrupted study resumes from it)")
    study.add_argument("--config", help="JSON or TOML file of study parameters, or a study.json to repeat a study "
                                        "exactly (flags override it)")
    study.add_argument("--set", dest="overrides", action="append", default=[], metavar="PARAM=VALUE",
                       help="set one study parameter (JSON value), e.g. --set delays=[0,1,2]")
    study.add_argument("--seeds", type=int, help="random initialisations per point")
    study.add_argument("--engine", choices=["local", "cluster"], default="local",
                       help="local: the in-process engine; cluster: a local cluster of node processes")
    study.add_argument("--cluster-nodes", type=int, default=2, help="node processes of the cluster engine")
    study.add_argument("--quiet", action="store_true", help="no progress bar")
    up = sub.add_parser("up", help="start a local cluster (broadcaster + N nodes) until Ctrl-C")
    up.add_argument("--nodes", type=int, default=2, help="parameter-node processes")
    up.add_argument("--state-dir", default="", help="broadcaster checkpoints survive restarts here")
    up.add_argument("--log-dir", default="", help="write each process's output to LOG_DIR/<name>.log")
    up.add_argument("--remote-evaluator", action="store_true",
                    help="run the forward passes in a separate evaluator process (the chip-in-the-loop hop)")
    up.add_argument("--no-api", dest="api", action="store_false", help="do not start the REST API")
    up.add_argument("--db", default="pmgd.sqlite", help="the API's SQLite file")
    up.add_argument("--metrics", action="store_true", help="serve Prometheus /metrics from every process")
    sub.add_parser("api", help="serve the REST API and the live dashboard", add_help=False)
    sub.add_parser("broadcaster", help="run the cost-broadcaster service", add_help=False)
    sub.add_parser("node", help="run one parameter-node process", add_help=False)
    sub.add_parser("evaluator", help="serve the broadcaster's forward passes (remote evaluator hop)", add_help=False)
    sub.add_parser("jobs", help="control jobs on a running API: submit, ls, show, stop, logs", add_help=False)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from services.train import train_job  # heavy imports (torch) only once a command runs

    config = config_from_args(args)
    summary = train_job(config, device=args.device, progress=not args.quiet, engine=args.engine, cluster=args.cluster)
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0


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
            raise ConfigError("set", f"must be PARAM=VALUE; got {item!r}")
        given[name.strip().replace("-", "_")] = value
    if args.seeds is not None:
        given["seeds"] = args.seeds
    params = resolve_params(study, given)
    console = Console(stderr=True)
    summary = run_study(study, params, args.out, engine=args.engine, progress=not args.quiet, console=console,
                        cluster_nodes=args.cluster_nodes)
    console.print(f"{study.name}: {summary['runs']} runs in {summary['points']} points → {args.out} "
                  f"(runs.csv, summary.json, {', '.join(summary['figures']) or 'no figures'})")
    return 0


def _load_mapping(path: str) -> dict:
    data = read_mapping(path)
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of study parameters")
    return data


def cmd_up(args: argparse.Namespace) -> int:
    import signal
    import time

    from services.cluster.launcher import LocalCluster

    if args.nodes < 1:
        raise ConfigError("nodes", f"must be an integer ≥ 1; got {args.nodes}")
    cluster = LocalCluster(args.nodes, state_dir=args.state_dir, log_dir=args.log_dir,
                           remote_evaluator=args.remote_evaluator, api=args.api, api_db=args.db, metrics=args.metrics)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        cluster.start()
        cluster.wait_ready()
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


def main(argv: list[str] | None = None) -> int:
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
        from pmgd_node.process import main as node_main
        return node_main(argv[1:])
    if argv and argv[0] == "jobs":
        from services.api.client import main as jobs_main
        return jobs_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "up":
            return cmd_up(args)
        if args.command == "study":
            return cmd_study(args)
    except ConfigError as err:
        parser.exit(2, f"pmgd: error: {err}\n")
    except (FileNotFoundError, RuntimeError) as err:
        parser.exit(1, f"pmgd: error: {err}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
