"""A small client of the REST API (`pmgd api`) and the ``pmgd jobs`` command.

::

    pmgd jobs [--api URL] [--token T] submit CONFIG [--engine local|cluster] [--no-start] [--angle]
    pmgd jobs ls | show ID [--json] | start ID | pause ID | resume ID | stop ID | rm ID
    pmgd jobs logs ID [--follow]

``--api`` defaults to ``$PMGD_API_URL`` or http://127.0.0.1:8000, ``--token`` to
``$PMGD_API_TOKEN``; the token is sent as ``Authorization: Bearer`` (the API asks for it on
POST and DELETE when it was started with one). Standard library only (urllib), so the
client adds no dependency. An HTTP error prints the API's ``detail`` and exits 1; an API
that cannot be reached says so by its URL and exits 1; a bad config file exits 2 naming
the field, as ``pmgd train`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL_STATES = ("finished", "diverged", "stopped", "failed", "interrupted")


class ApiError(RuntimeError):
    """The API answered with an HTTP error; ``detail`` is its message."""

    def __init__(self, status: int, detail: str, method: str = "", path: str = ""):
        self.status, self.detail, self.method, self.path = status, detail, method, path
        super().__init__(f"{detail} (HTTP {status} on {method} {path})")


class ApiUnreachable(RuntimeError):
    def __init__(self, url: str, reason: str):
        self.url = url
        super().__init__(f"cannot reach the API at {url} ({reason})")


def _detail(body: bytes, fallback: str) -> str:
    """FastAPI's error body is {"detail": str} or {"detail": [{"loc": [...], "msg": str}, ...]}."""
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()
        return text[:500] or fallback
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", ()) if x != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


class ApiClient:
    """The REST API, one method per endpoint. Every call raises ApiError or ApiUnreachable."""

    def __init__(self, url: str = DEFAULT_URL, token: str = "", timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as err:
            raise ApiError(err.code, _detail(err.read(), err.reason or "error"), method, path) from None
        except urllib.error.URLError as err:
            raise ApiUnreachable(self.url, str(getattr(err, "reason", err))) from None
        except (ConnectionError, TimeoutError) as err:
            raise ApiUnreachable(self.url, str(err) or type(err).__name__) from None
        if raw:
            return payload
        return json.loads(payload) if payload else None

    # --- endpoints -----------------------------------------------------------------------------
    def health(self) -> dict:
        return self.request("GET", "/health")

    def jobs(self) -> list[dict]:
        return self.request("GET", "/jobs")

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/jobs/{_q(job_id)}")

    def submit(self, config: dict, engine: str = "local", start: bool = True, angle: bool = False) -> dict:
        return self.request("POST", "/jobs", {"config": config, "engine": engine, "start": start, "angle": angle})

    def action(self, job_id: str, verb: str) -> dict:
        """``verb``: start, pause, resume or stop."""
        return self.request("POST", f"/jobs/{_q(job_id)}/{verb}")

    def delete(self, job_id: str) -> None:
        self.request("DELETE", f"/jobs/{_q(job_id)}")

    def metrics(self, job_id: str, since: int | None = None) -> dict:
        return self.request("GET", f"/jobs/{_q(job_id)}/metrics" + ("" if since is None else f"?since={since}"))

    def logs(self, job_id: str, since: int | None = None) -> list[dict]:
        path = f"/jobs/{_q(job_id)}/logs" + ("" if since is None else f"?since={since}")
        return self.request("GET", path)["lines"]

    def checkpoint(self, job_id: str) -> bytes:
        return self.request("GET", f"/jobs/{_q(job_id)}/checkpoint", raw=True)

    def cluster(self) -> dict:
        return self.request("GET", "/cluster")


def _q(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")


# --- the `pmgd jobs` command ----------------------------------------------------------------------

def _when(t: float | None) -> str:
    return "—" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _task(job: dict) -> str:
    return str((job.get("config") or {}).get("task", "?"))


def _converged(job: dict) -> str:
    s = job.get("summary") or {}
    return f"{s['converged']}/{s['runs']}" if "converged" in s and "runs" in s else "—"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _config_fields(config: dict) -> str:
    """The fields that differ from the task's defaults (the whole config is in --json)."""
    from pmgd_node.config import JobConfig

    try:
        defaults = JobConfig(task=config.get("task", "parity2")).to_dict()
    except ValueError:
        defaults = {}
    shown = {k: v for k, v in config.items() if k == "task" or defaults.get(k, object()) != v}
    return ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items())


def _console():
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:  # piped or captured: never truncate ids to the 80-column default
        console = Console(highlight=False, soft_wrap=False, width=max(console.width, 160))
    return console


def cmd_submit(api: ApiClient, args: argparse.Namespace) -> int:
    from pmgd_node.config import JobConfig, read_mapping

    fields = read_mapping(args.config)  # a file it cannot read or parse: ConfigError naming the file and line
    JobConfig.from_dict(fields)  # validate here: a bad field raises ConfigError naming it
    # Send the file's fields, not the filled-in config: the API fills in its own defaults, so
    # a client and an API of different versions agree on every field the user did not set.
    job = api.submit(fields, engine=args.engine, start=args.start, angle=args.angle)
    print(job["id"])
    print(f"submitted {_task(job)} job {job['id']} on the {job['engine']} engine: {job['state']}", file=sys.stderr)
    return 0


def cmd_ls(api: ApiClient, args: argparse.Namespace) -> int:
    jobs = api.jobs()
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"jobs at {api.url}", title_justify="left")
    for name, justify, width in (("id", "left", 12), ("state", "left", 11), ("engine", "left", 7),
                                 ("task", "left", 7), ("tick", "right", 0), ("converged", "right", 0),
                                 ("created", "left", 0)):
        table.add_column(name, justify=justify, no_wrap=True, min_width=width or None)
    for job in jobs:
        table.add_row(job["id"], job["state"], job["engine"], _task(job), f"{job.get('tick') or 0:,}",
                      _converged(job), _when(job.get("created")))
    _console().print(table if jobs else "no jobs")
    return 0


def cmd_show(api: ApiClient, args: argparse.Namespace) -> int:
    job = api.job(args.id)
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    from rich.table import Table

    console = _console()
    head = Table(title=f"job {job['id']}", title_justify="left", show_header=False)
    head.add_column("field", style="bold")
    head.add_column("value")
    for key in ("state", "engine", "tick"):
        head.add_row(key, _fmt(job.get(key)))
    head.add_row("created", _when(job.get("created")))
    head.add_row("updated", _when(job.get("updated")))
    head.add_row("angle", "recorded" if (job.get("options") or {}).get("angle") else "not recorded")
    if job.get("error"):
        head.add_row("error", str(job["error"]))
    config = job.get("config") or {}
    head.add_row("config", _config_fields(config) + "  (other fields: defaults)")
    console.print(head)
    summary = job.get("summary")
    if summary:
        table = Table(title="summary", title_justify="left", show_header=False)
        table.add_column("metric", style="bold")
        table.add_column("value")
        for key, value in summary.items():
            if key in ("config", "theta0", "trail"):
                continue  # the config is above; θ⁰ and its hash are for machines (use --json)
            table.add_row(key, _fmt(value))
        console.print(table)
    return 0


def cmd_action(api: ApiClient, args: argparse.Namespace) -> int:
    job = api.action(args.id, args.command)
    print(f"job {job['id']}: {job['state']}")
    return 0


def cmd_rm(api: ApiClient, args: argparse.Namespace) -> int:
    api.delete(args.id)
    print(f"job {args.id}: deleted")
    return 0


def _print_lines(lines: list[dict]) -> int:
    seq = 0  # log seqs start at 1; ?since=0 means "all"
    for line in lines:
        stamp = time.strftime("%H:%M:%S", time.localtime(line.get("time") or 0))
        print(f"{stamp}  {line['text']}", flush=True)
        seq = max(seq, int(line["seq"]))
    return seq


def cmd_logs(api: ApiClient, args: argparse.Namespace) -> int:
    last = _print_lines(api.logs(args.id))
    if not args.follow:
        return 0
    try:
        while True:
            # Read the state before the lines: once a final state is seen, one more read of
            # the lines holds everything the job logged up to and including its end.
            state = api.job(args.id)["state"]
            last = max(last, _print_lines(api.logs(args.id, since=last)))
            if state in FINAL_STATES:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    # --api/--token are accepted before or after the subcommand; the copies on the
    # subcommands default to SUPPRESS so they never overwrite a value given before it.
    def connection(p: argparse.ArgumentParser, top: bool) -> None:
        default = None if top else argparse.SUPPRESS
        p.add_argument("--api", default=default, metavar="URL",
                       help=f"API base URL (default: $PMGD_API_URL or {DEFAULT_URL})")
        p.add_argument("--token", default=default, help="bearer token for POST/DELETE (default: $PMGD_API_TOKEN)")

    parser = argparse.ArgumentParser(prog="pmgd jobs", description="Control jobs on a running PMGD API (pmgd api).")
    connection(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        connection(p, top=False)
        return p

    p = add("submit", "submit a job from a JSON or TOML job-config file; prints its id")
    p.add_argument("config", metavar="CONFIG", help="JSON or TOML file of job-config fields")
    p.add_argument("--engine", choices=["local", "cluster"], default="local",
                   help="local: the in-process engine; cluster: the broadcaster and nodes (default: local)")
    p.add_argument("--start", action=argparse.BooleanOptionalAction, default=True,
                   help="start the job at once (default: start)")
    p.add_argument("--angle", action="store_true", help="record the gradient angle against backprop")
    p = add("ls", "list the jobs")
    p.add_argument("--json", action="store_true", help="print the raw job objects")
    p = add("show", "show one job and its summary")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print the raw job object")
    for verb in ("start", "pause", "resume", "stop"):
        add(verb, f"{verb} a job").add_argument("id", metavar="ID")
    add("rm", "delete a job that is not running").add_argument("id", metavar="ID")
    p = add("logs", "print a job's log lines")
    p.add_argument("id", metavar="ID")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new lines until the job is finished, diverged, stopped, failed or interrupted")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between polls with --follow")
    return parser


_COMMANDS = {"submit": cmd_submit, "ls": cmd_ls, "show": cmd_show, "start": cmd_action, "pause": cmd_action,
             "resume": cmd_action, "stop": cmd_action, "rm": cmd_rm, "logs": cmd_logs}


def main(argv: list[str] | None = None) -> int:
    from pmgd_node.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    url = args.api or os.environ.get("PMGD_API_URL") or DEFAULT_URL
    token = args.token if args.token is not None else os.environ.get("PMGD_API_TOKEN", "")
    api = ApiClient(url, token)
    try:
        return _COMMANDS[args.command](api, args)
    except ConfigError as err:
        print(f"pmgd jobs: error: {err}", file=sys.stderr)
        return 2
    except ApiError as err:
        print(f"pmgd jobs: error: {err.detail} (HTTP {err.status})", file=sys.stderr)
        return 1
    except ApiUnreachable as err:
        print(f"pmgd jobs: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
