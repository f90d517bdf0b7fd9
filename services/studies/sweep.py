"""The study runner: a sweep of points, each a training job (all its seeds), into a folder.

``run_study(study, params, out)`` runs every point of the study that the folder does not
hold yet, with a progress bar, and after each point rewrites

    out/study.json      the study's name, question, parameters, code version and machine
    out/points.jsonl    one line per finished point (its key and rows): what resuming reads
    out/runs.csv        one row per run (point × seed) with every column
    out/summary.json    the study's summary of all rows
    out/*.png           the study's figures (at the end)

An interrupted study resumes where it stopped when run again with the same parameters;
other parameters in an existing folder are refused (nothing is overwritten).

Points are independent, so they may run anywhere (``executor.py``): one after another in this
process (``workers=1``, as ``pmgd study`` always ran), in local worker processes
(``workers=N``) or on a Dask cluster (``scheduler``). Whatever runs them, the runner alone
writes: each point's entry is appended to ``points.jsonl`` as it finishes (nothing finished is
lost to an interruption) and at most once per key (an executor that reruns a point after a
worker died cannot count it twice); ``runs.csv`` always lists the points in the study's order,
and at the end ``points.jsonl`` is rewritten in that order too, so the files are the same
whatever the number of workers and the order in which points finished.

A study (``Study``) declares its parameters with defaults, the points of its sweep, how a
point runs (by default: train ``point.config`` and return one row per seed), its figures
and its summary. ``Context.train`` runs a job on the in-process engine or on a local
cluster (``--engine cluster``), so every study runs on both.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pmgd_node.config import ConfigError, JobConfig


@dataclass(frozen=True)
class Point:
    """One point of a sweep: the swept values (``key``) and the job they make."""

    key: dict[str, Any]
    config: JobConfig | None = None


@dataclass
class Trained:
    """A job's outcome: one row per run (seed) and the evaluation history (tick, cost, accuracy)."""

    rows: list[dict]
    history: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)


class Study(ABC):
    name: str = ""
    question: str = ""
    params: dict[str, Any] = {}  # parameter → default (its type is the default's type)

    @abstractmethod
    def points(self, p: dict) -> list[Point]:
        ...

    def run(self, point: Point, p: dict, ctx: Context) -> list[dict]:
        """Rows of one point; by default one per seed of ``point.config``."""
        return ctx.train(point.config).rows

    def figures(self, rows: list[dict], p: dict, out: str) -> list[str]:
        return []

    def summary(self, rows: list[dict], p: dict) -> dict:
        return {}


def param_error(name: str, message: str) -> ConfigError:
    """A bad study parameter, labelled as one (not as a job-config field)."""
    return ConfigError(name, message, kind="study parameter")


def resolve_params(study: Study, given: dict[str, Any]) -> dict[str, Any]:
    """The study's defaults overridden by ``given``, each converted to its default's type.

    The study's points are built once here, so that a value no job accepts stops the study
    before it starts, named as the study parameter it came from."""
    unknown = sorted(set(given) - set(study.params))
    if unknown:
        raise param_error(unknown[0], f"not a parameter of study {study.name}; its parameters: "
                                      f"{', '.join(study.params)}")
    out = dict(study.params)
    for name, value in given.items():
        default = study.params[name]
        out[name] = _convert(name, value, default)
    try:
        study.points(out)
    except ConfigError as err:
        if err.field in study.params:  # a parameter passed on to the job field of the same name
            raise param_error(err.field, err.message) from None
        raise ConfigError(study.name, f"its parameters make a job no engine accepts: {err}", kind="study") from None
    except (ValueError, KeyError, TypeError) as err:  # e.g. a perturbation type the study has no base for
        raise ConfigError(study.name, f"its parameters do not fit together: {type(err).__name__}: {err}",
                          kind="study") from None
    return out


def _convert(name: str, value: Any, default: Any) -> Any:
    if isinstance(value, str) and (not isinstance(default, str) or value.startswith('"')):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise param_error(name, f"must be JSON like {json.dumps(default)}; got {value!r}") from None
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is list and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if default is not None and not isinstance(value, kind) or isinstance(value, bool) != isinstance(default, bool):
        raise param_error(name, f"must be of type {kind.__name__} like {json.dumps(default)}; got {value!r}")
    return value


def code_version() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import version

    return "pmgd-cluster " + version("pmgd-cluster")


def machine() -> dict:
    import torch

    info = {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return info


class Context:
    """How a study's jobs run: ``engine`` local (in-process) or cluster (a local cluster of
    ``cluster_nodes`` node processes, started on first use and stopped by ``close``).

    On the cluster, async timing needs a wall clock: a job that names no ``tick_period``
    ticks every ``ASYNC_TICK_S`` seconds there."""

    ASYNC_TICK_S = 0.002

    def __init__(self, engine: str = "local", cluster_nodes: int = 2, device: str | None = None):
        if engine not in ("local", "cluster"):
            raise ConfigError("engine", f"must be local or cluster; got {engine!r}", kind="option")
        self.engine, self.cluster_nodes, self.device = engine, cluster_nodes, device
        self._cluster = None

    def train(self, config: JobConfig) -> Trained:
        from services import runtime

        control, keys = "", None
        if self.engine == "cluster":
            from services.cluster.launcher import LocalCluster

            if self._cluster is None:  # one cluster for the whole study
                self._cluster = LocalCluster(self.cluster_nodes).start()
            control, keys = self._cluster.endpoints["control"], self._cluster.keys
            config = config.replace(nodes=min(self.cluster_nodes,
                                              config.nodes if config.nodes > 1 else self.cluster_nodes))
            if config.timing == "async" and not config.tick_period:
                config = config.replace(tick_period=self.ASYNC_TICK_S)
        result = runtime.run(config, self.engine, control=control, device=self.device, keys=keys)
        rows = [{"seed": config.seed + r, "solved": bool(result.solved[r]),
                 "ticks_to_solution": int(result.ticks_to_solution[r]),
                 "c0_to_solution": int(result.c0_to_solution[r]), "ticks_run": result.ticks,
                 "final_cost": float(result.final_cost[r]), "final_accuracy": float(result.final_accuracy[r]),
                 "diverged_at": int(result.diverged_at[r])}
                for r in range(config.seeds)]
        return Trained(rows, [(p.tick, p.cost, p.accuracy) for p in result.history])

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None


def point_entry(study: Study, point: Point, params: dict, ctx: Context) -> dict:
    """What the runner keeps of one point, as plain JSON data: its key, its rows (each row
    carries the key's columns) and ``wall_s``, the seconds it took (a wall time: the one
    number that differs from run to run)."""
    started = time.perf_counter()
    rows = [dict(point.key, **row) for row in study.run(point, params, ctx)]
    entry = {"key": point.key, "rows": rows, "wall_s": time.perf_counter() - started}
    return json.loads(json.dumps(entry, default=_plain))


# In a worker process (local or Dask): one Context per engine for every point the process runs,
# so a cluster engine is started once per worker; and the last study's points, built once.
_worker_contexts: dict[tuple[str, int], Context] = {}
_worker_points: dict[str, list[Point]] = {}


def _close_worker_contexts() -> None:
    while _worker_contexts:
        _worker_contexts.popitem()[1].close()


def run_point(name: str, params: dict, index: int, key: dict, engine: str = "local", cluster_nodes: int = 2) -> dict:
    """Point ``index`` of study ``name`` with resolved ``params``, run in this (worker) process:
    its :func:`point_entry`. ``key`` is the point's key as the runner knows it, checked here (a
    worker running other code, or another study's parameters, must not answer for the point).

    Called by name in worker processes (``executor.py``): everything it needs travels as
    plain data, and what it keeps between points (a Context per engine, with its port block:
    ``ports.py``) belongs to the process."""
    import atexit

    from services import studies

    from . import ports
    from .workers import limit_torch_threads

    if not _worker_contexts and not _worker_points:  # the process's first point
        ports.claim()
        limit_torch_threads()
        atexit.register(_close_worker_contexts)
    study = studies.get(name)
    tag = json.dumps([name, params], sort_keys=True)
    if tag not in _worker_points:
        _worker_points.clear()
        _worker_points[tag] = study.points(params)
    points = _worker_points[tag]
    if not 0 <= index < len(points) or json.dumps(points[index].key, sort_keys=True) != json.dumps(key, sort_keys=True):
        raise RuntimeError(f"point {index} of study {name} is not {key} in this worker: is it running other code?")
    if (engine, cluster_nodes) not in _worker_contexts:
        _worker_contexts[engine, cluster_nodes] = Context(engine, cluster_nodes)
    return point_entry(study, points[index], params, _worker_contexts[engine, cluster_nodes])


def _write_csv(path: str, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    os.replace(tmp, path)


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=_plain)
    os.replace(tmp, path)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def run_study(study: Study, params: dict, out: str, engine: str = "local", progress: bool = True,
              console=None, cluster_nodes: int = 2, workers: int = 1, scheduler: str = "",
              scheduler_security: str = "", point_resources: dict | None = None) -> dict:
    """Run (or resume) ``study`` with resolved ``params`` into folder ``out``; returns the summary.

    ``workers`` 1 runs the points in this process; more run them in that many local worker
    processes; ``scheduler`` (a Dask scheduler's address, or ``local`` to start a local Dask
    cluster of ``workers`` processes) on a Dask cluster, authenticated with the TLS files in
    ``scheduler_security``, each point asking its worker for ``point_resources`` (e.g.
    ``{"GPU": 1}``). See ``executor.py``; the files written are the same in every case."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .executor import label, make_executor

    console = console or Console(stderr=True)
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "study.json")
    points_path = os.path.join(out, "points.jsonl")
    done: dict[str, dict] = {}
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("study") != study.name or old.get("params") != json.loads(json.dumps(params)) \
                or old.get("engine") != engine:
            raise ConfigError("out", f"{out} holds study {old.get('study')} with other parameters or engine; "
                                     "use another --out to start afresh", kind="option")
        if os.path.exists(points_path):
            with open(points_path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        entry = json.loads(line)
                        done.setdefault(json.dumps(entry["key"], sort_keys=True), entry)
    version = code_version()
    earlier = old.get("code_versions", [old.get("code_version")]) if done else []
    if earlier and version not in earlier:
        console.print(f"[yellow]note: the points already in {out} were run by code {', '.join(earlier)}; "
                      f"this is {version}[/yellow]")
    _write_json(meta_path, {"study": study.name, "question": study.question, "params": params, "engine": engine,
                            "code_version": version, "code_versions": sorted(set(earlier) | {version}),
                            "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    points = study.points(params)
    order = {json.dumps(pt.key, sort_keys=True): i for i, pt in enumerate(points)}

    def in_order() -> list[dict]:
        return sorted((e for k, e in done.items() if k in order), key=lambda e: order[json.dumps(e["key"],
                                                                                               sort_keys=True)])

    todo = [(i, pt) for i, pt in enumerate(points) if json.dumps(pt.key, sort_keys=True) not in done]
    if done:
        console.print(f"resuming {study.name}: {len(points) - len(todo)} of {len(points)} points already in {out}")
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("points · {task.fields[now]}"), TimeElapsedColumn(), console=console,
                   disable=not progress)
    running: list[str] = []
    last = [""]

    def show(task) -> None:
        now = (f"running {'; '.join(running[:3])}" + (f" (+{len(running) - 3})" if len(running) > 3 else "")
               if running else "")
        bar.update(task, now=" · ".join(x for x in (now, last[0]) if x))

    executor = make_executor(study, params, engine, cluster_nodes, workers, scheduler, scheduler_security,
                             point_resources, points=len(todo)) if todo else None
    try:
        with bar, open(points_path, "a", encoding="utf-8") as log:
            task = bar.add_task(study.name, total=len(points), completed=len(points) - len(todo), now="")

            def started(pt: Point) -> None:
                running.append(label(pt))
                show(task)

            for entry in (executor.run(todo, started) if executor else ()):
                key = json.dumps(entry["key"], sort_keys=True)
                name = label(Point(entry["key"]))
                if name in running:
                    running.remove(name)
                if key in done or key not in order:  # a rerun the executor made, or not ours: written once
                    continue
                log.write(json.dumps(entry, default=_plain) + "\n")
                log.flush()
                done[key] = entry
                _write_csv(os.path.join(out, "runs.csv"), [r for e in in_order() for r in e["rows"]])
                last[0] = f"last {name} in {entry['wall_s']:.1f} s"
                bar.advance(task)
                show(task)
    finally:
        if executor is not None:
            executor.close()
    entries = in_order()
    # The log in the points' order (it was appended in the order points finished).
    tmp = points_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e, default=_plain) + "\n" for e in entries)
    os.replace(tmp, points_path)
    rows = [r for e in entries for r in e["rows"]]
    _write_csv(os.path.join(out, "runs.csv"), rows)
    summary = {"study": study.name, "question": study.question, "points": len(points), "runs": len(rows),
               **study.summary(rows, params)}
    summary["figures"] = [os.path.basename(f) for f in study.figures(rows, params, out)]
    _write_json(os.path.join(out, "summary.json"), summary)
    return summary
