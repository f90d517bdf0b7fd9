"""The one seam between a job and what runs it: the in-process engine or a cluster.

    result = run(config)                                          # the engine, in this process
    result = run(config, "cluster", control="tcp://127.0.0.1:5556")  # a running broadcaster (pmgd up)
    result = run(config, "cluster")                               # a local cluster started for this job

Every runtime returns a :class:`~services.chip.job.JobResult`, so `pmgd train`, `pmgd study`
and the API's job threads shape their numbers the same way whichever ran the job. ``on_eval(point, solved)``
is called at every evaluation with the :class:`~services.chip.job.EvalPoint` and the number of
runs solved so far. ``JobResult.details`` carries what only one runtime knows (the engine's
device; the cluster's job id, epochs, checkpoints, drop counts, final θ⁰ and θ⁰ trail).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pmgd_node.config import ConfigError, JobConfig
from pmgd_node.shell.keys import Keys
from services.chip.job import EvalPoint, JobResult

RUNTIMES = ("local", "cluster")
OnEval = Callable[[EvalPoint, int], None]


def run(config: JobConfig, runtime: str = "local", *, control: str = "", device: str | None = None,
        on_eval: OnEval | None = None, timeout_s: float = 24 * 3600.0, engine=None, job_id: str = "",
        cancelled: Callable[[], bool] | None = None, on_progress: Callable[[dict], None] | None = None,
        keys: Keys | None = None) -> JobResult:
    """Run ``config`` to its stopping rule on ``runtime`` ("local" or "cluster").

    Local: ``engine`` continues an :class:`~services.engine.engine.Engine` the caller built
    (and perhaps restored from a checkpoint); by default a fresh one. Cluster: ``job_id``
    names the job on the broadcaster (re-submitting it re-attaches), ``cancelled()`` stops
    waiting for it, and ``on_progress(d)`` sees each raw progress message (per-tick reports,
    checkpoints) besides ``on_eval``; ``keys`` are the running cluster's (a local cluster
    started here makes its own); locally, the keys towards the job's chip (``config.chip``), if any.
    """
    if runtime == "local":
        return _run_local(config, device, on_eval, engine, keys)
    if runtime == "cluster":
        return _run_cluster(config, control, on_eval, timeout_s, job_id, cancelled, on_progress, keys)
    raise ConfigError("engine", f"must be one of {', '.join(RUNTIMES)}; got {runtime!r}", kind="option")


def _run_local(config: JobConfig, device: str | None, on_eval: OnEval | None, engine=None,
               keys: Keys | None = None) -> JobResult:
    from services.engine.engine import Engine

    engine = engine or Engine(config, device=device, chip_keys=keys)  # keys: towards config.chip, if any
    result = engine.run(None if on_eval is None else lambda point, solved: on_eval(point, int(solved.sum())))
    result.details["device"] = str(getattr(engine.model, "device", "cpu"))
    return result


def _run_cluster(config: JobConfig, control: str, on_eval: OnEval | None, timeout_s: float, job_id: str = "",
                 cancelled=None, on_progress=None, keys: Keys | None = None) -> JobResult:
    from services.cluster.client import run_job
    from services.cluster.launcher import LocalCluster

    history: list[EvalPoint] = []

    def progress(d: dict) -> None:
        point = EvalPoint(int(d["tick"]), int(d.get("c0", -1)), _floats(d["cost"]),
                          _floats(d["accuracy"]))
        history.append(point)
        if on_progress is not None:
            on_progress(d)
        if on_eval is not None:
            on_eval(point, int(d["solved"]))

    options = dict(timeout_s=timeout_s, job_id=job_id, cancelled=cancelled)
    if control:
        summary = run_job(config, control, progress, keys=keys, **options)
    else:
        with LocalCluster(config.nodes) as cluster:
            summary = run_job(config, cluster.endpoints["control"], progress, keys=cluster.keys, **options)
    return result_from_summary(config, summary, history)


def _floats(values) -> np.ndarray:
    """Per-run numbers from JSON, where a diverged run's NaN travels as None."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def result_from_summary(config: JobConfig, s: dict, history: list[EvalPoint] | None = None) -> JobResult:
    """The :class:`JobResult` of a job whose runtime sent its :func:`~services.chip.job.summarize`."""
    S = config.seeds

    def per_run(name: str) -> np.ndarray:
        if name in s:
            return np.asarray(s[name], dtype=np.int64)
        median = s.get(f"{name}_median")  # one run: its own value, or None when unsolved
        return np.full(S, -1 if median is None else int(median), dtype=np.int64)

    t_sol = per_run("ticks_to_solution")
    details = {k: s[k] for k in ("job", "epochs", "checkpoints", "dropped", "theta0", "trail", "run_wall_time_s")
               if k in s}
    return JobResult(config, int(s["num_params"]), int(s["ticks_run"]), int(s["c0_measurements_run"]), t_sol >= 0,
                     t_sol, per_run("c0_to_solution"), _floats(s["final_cost"]), _floats(s["final_accuracy"]),
                     float(s.get("run_wall_time_s") or 0.0), list(history or []),
                     np.asarray(s["diverged_at"], dtype=np.int64), details)
