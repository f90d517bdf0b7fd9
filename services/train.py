"""One training job with a progress bar: the body that `pmgd train` and the Python API (``pmgd.train``)
share, and the summary table `pmgd train` prints."""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pmgd_node.config import ConfigError, JobConfig
from pmgd_node.shell.keys import Keys
from services import runtime
from services.chip.job import HW_TIMESCALES, EvalPoint, JobResult, finite_median, summarize


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    for unit, scale in (("h", 3600), ("min", 60), ("s", 1), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"


def summary_table(summary: dict) -> Table:
    t = Table(title=f"PMGD {summary['task']} ({summary['network']}, {summary['num_params']} params, "
                    f"{summary['perturbation'].upper()}, {summary['mode']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    runs = summary["runs"]
    t.add_row("runs converged", f"{summary['converged']} / {runs}")
    if summary.get("diverged"):
        first = min(t for t in summary["diverged_at"] if t >= 0)
        t.add_row("[bold red]runs diverged[/]",
                  f"[bold red]{summary['diverged']} / {runs} (first at tick {first:,})[/]")
    med = summary["ticks_to_solution_median"]
    if med is not None:
        label = "perturbed ticks to target" + (" (median, q1–q3)" if runs > 1 else "")
        quartiles = f"  ({summary['ticks_to_solution_q1']:,.0f}–{summary['ticks_to_solution_q3']:,.0f})"
        value = f"{med:,.0f}" + (quartiles if runs > 1 else "")
        t.add_row(label, value)
        t.add_row("C₀ measurements to target" + (" (median)" if runs > 1 else ""),
                  f"{summary['c0_to_solution_median']:,.0f}")
    else:
        t.add_row("perturbed ticks to target", "not reached")
    t.add_row("perturbed ticks run", f"{summary['ticks_run']:,}")
    t.add_row("C₀ measurements run", f"{summary['c0_measurements_run']:,}")
    over = " (median" + (" of the runs that did not diverge)" if summary.get("diverged") else ")")
    cost, accuracy = summary["final_cost_median"], summary["final_accuracy_median"]
    t.add_row("final cost" + (over if runs > 1 else ""), "—" if cost is None else f"{cost:.4g}")
    t.add_row("final accuracy" + (over if runs > 1 else ""), "—" if accuracy is None else f"{100 * accuracy:.1f} %")
    t.add_row("wall time (the whole run)", _fmt_time(summary["wall_time_s"]))
    t.add_row("training time (the ticks alone)", _fmt_time(summary.get("training_time_s")))
    projected = summary["projected_solution_time_s"] or {}
    for hw, tau in HW_TIMESCALES.items():
        t.add_row(f"solution time {hw} (τ_p = {_fmt_time(tau)})", _fmt_time(projected.get(hw)))
    return t


def _status(cost, accuracy, solved: int, runs: int, diverged: int = 0) -> str:
    cost, accuracy = finite_median(cost), finite_median(accuracy)
    if cost is None:
        return f"[red]diverged {diverged or runs}/{runs}[/]"
    text = f"cost {cost:.4f} · acc {100 * accuracy:.1f}% · solved {solved}/{runs}"
    return text + (f" · [red]diverged {diverged}[/]" if diverged else "")


def _at_most_every(seconds: float, show):
    """``show`` throttled to one call per ``seconds``: the bar redraws at 10 Hz anyway, and an
    update per evaluation (2,000 of them for parity) cost 0.2–0.4 s of a 2 s run."""
    last = [-seconds]

    def call(*args):
        now = time.monotonic()
        if now - last[0] >= seconds:
            last[0] = now
            show(*args)
    return call


def run_job(config: JobConfig, *, engine: str = "local", device: str | None = None, progress: bool = True,
            console: Console | None = None, cluster: str = "", keys: Keys | None = None,
            started: float | None = None, workers: int = 1) -> tuple[JobResult, dict, np.ndarray | None]:
    """Run ``config`` to its stopping rule; return its result, its summary and the final θ⁰.

    The one body of a training job: `pmgd train` (:func:`train_job`) and the Python API
    (``pmgd.train``) both call it, so a job gives the same numbers whichever started it.

    ``engine`` "local" runs the in-process engine; "cluster" submits the job to the
    broadcaster at ``cluster`` (a control endpoint), or, when that is empty, to a local
    cluster of ``config.nodes`` node processes started for this job and stopped after it;
    ``keys`` are the running cluster's client keys. ``progress`` draws a rich progress bar
    on ``console`` (default: stderr) while the ticks run; nothing else is printed here.

    The summary is :func:`~services.chip.job.summarize`'s, plus what the runtime alone knows
    (``JobResult.details``: the engine's device; the cluster's job id, epochs, checkpoints,
    drop counts, final θ⁰ and θ⁰ trail), ``engine``, ``config`` and two times, the same on
    both engines: ``wall_time_s`` is the run as the user waited for it, from ``started`` (a
    ``time.perf_counter()`` reading taken when the command began; default: now) to the
    summary, so cluster start-up, model and data count; and ``training_time_s`` counts the
    ticks alone (the engine's loop; on the cluster, from the broadcaster's first shard
    assignment to the end). It is what `pmgd train --json` writes.

    θ⁰ is (runs, P): on the engine, the nodes' θ⁰ at the end, in the model's dtype; on the
    cluster, the broadcaster's final θ⁰, which travels as JSON numbers and so comes back as
    float64 holding the same values (a float32 model's θ⁰ compares equal, bit for bit).

    ``workers`` > 1 (local engine) splits the seeds over that many worker processes
    (:func:`run_split`): the same result and summary, bar the times.
    """
    started = time.perf_counter() if started is None else started
    if workers > 1 and config.seeds > 1:
        if engine != "local":
            raise ConfigError("workers", f"splits the seeds of a job on the local engine only; this job runs on "
                                         f"the {engine} engine", kind="option")
        result, theta0 = run_split(config, workers, device=device, console=console if progress else None)
        summary = summarize(result)
        summary.update(result.details, training_time_s=result.wall_time, engine=engine,
                       wall_time_s=time.perf_counter() - started, config=config.to_dict())
        return result, summary, theta0
    console = console or Console(stderr=True)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("ticks · {task.fields[status]}"), TimeElapsedColumn(),
                   console=console, disable=not progress, transient=False)
    task = bar.add_task("training", total=config.max_ticks, status="")

    def show(tick: int, cost, accuracy, solved: int, runs: int) -> None:
        bar.start()  # drawn once training runs: a job failing in its set-up shows only its error
        bar.update(task, completed=tick, status=_status(cost, accuracy, solved, runs))

    show = _at_most_every(0.1, show)
    # The engine is built here rather than by runtime.run so that its final θ⁰ can be read
    # after the run (runtime.run returns only the JobResult, which has no θ⁰ on this path).
    local = None
    if engine == "local":
        from services.engine.engine import Engine

        local = Engine(config, device=device, chip_keys=keys)
    try:
        result = runtime.run(config, engine, control=cluster, device=device, keys=keys, engine=local,
                             on_eval=lambda point, solved: show(point.tick, point.cost, point.accuracy, solved,
                                                                config.seeds))
        summary = summarize(result)
        summary.update(result.details, training_time_s=result.wall_time)
        bar.start()
        bar.update(task, total=summary["ticks_run"], completed=summary["ticks_run"],
                   status=_status(summary["final_cost"], summary["final_accuracy"], summary["converged"],
                                  summary["runs"], summary.get("diverged", 0)))
    finally:
        bar.stop()
    summary["engine"] = engine
    summary["wall_time_s"] = time.perf_counter() - started
    summary["config"] = config.to_dict()
    if local is not None:
        theta0 = local.theta0.copy()
    elif "theta0" in result.details:
        theta0 = np.asarray(result.details["theta0"], dtype=np.float64)
    else:
        theta0 = None
    return result, summary, theta0


def train_job(config: JobConfig, device: str | None = None, progress: bool = True,
              console: Console | None = None, engine: str = "local", cluster: str = "",
              started: float | None = None, keys: Keys | None = None, workers: int = 1) -> dict:
    """`pmgd train`: :func:`run_job` with a progress bar, then the summary table; returns the
    summary (what ``--json`` writes). The arguments are :func:`run_job`'s."""
    console = console or Console(stderr=True)
    _, summary, _ = run_job(config, engine=engine, device=device, progress=progress, console=console,
                            cluster=cluster, keys=keys, started=started, workers=workers)
    console.print(summary_table(summary))
    return summary


# --- one job's seeds split over worker processes (pmgd train --workers N) ----------------------
#
# Run r of a job is seed + r alone (its θ⁰, perturbation and noise draw from seed + r), so runs
# [k, k + n) are the job {seed: seed + k, seeds: n} -- but for what a job draws from its seed
# as a whole, and for when it stops:
#
# * the input order: every run of a job sees the order drawn from the job's ``seed``, so a
#   slice's engine is handed the whole job's order (``InputSchedule(…, seed)``, replacing the
#   one its own seed would draw) before it starts;
# * the links' fates (jitter, drop) and async node clocks are drawn from the job's seed too:
#   jobs that have them are refused (:func:`check_splittable`), as are jobs on a chip;
# * a job trains every run until all are over (or max_ticks): a run's final cost depends on
#   when the slowest run of the *whole job* solved. A slice whose runs were all over before
#   the last slice's is continued from its snapshot (``Engine.snapshot``/``restore``, exact
#   for sync timing without delayed C̃ in flight, hence no ``delay`` either) to the job's last
#   tick, without a stopping rule, so its final numbers are those of the whole job.


def seed_slices(seeds: int, workers: int) -> list[tuple[int, int]]:
    """(first run, number of runs) of each worker's contiguous slice, sizes differing by one at most."""
    parts = max(1, min(workers, seeds))
    base, extra = divmod(seeds, parts)
    out, first = [], 0
    for i in range(parts):
        runs = base + (i < extra)
        out.append((first, runs))
        first += runs
    return out


def check_splittable(config: JobConfig) -> None:
    """Refuse, naming the field, a job whose seeds cannot be split exactly (see above)."""
    why = "draws from the job's seed as a whole, so a slice of its seeds would not reproduce the job"
    if config.chip:
        raise ConfigError("chip", "a job on a chip cannot split its seeds over workers (one chip, one job)")
    if config.timing != "sync":
        raise ConfigError("timing", f"async node clocks: their drift {why}; use --workers 1")
    for name in ("jitter", "drop"):
        if getattr(config, name):
            raise ConfigError(name, f"the link's {name} {why}; use --workers 1")
    if config.delay:
        raise ConfigError("delay", "C̃ in flight on a delayed link cannot be carried over to the job's last tick "
                                   "(a slice's continuation); use --workers 1")
    if config.node_links:
        raise ConfigError("node_links", f"per-node links: their fates {why}; use --workers 1")


def _slice_engine(config: JobConfig, order_seed: int, device: str | None):
    from services.chip.output_stage import InputSchedule
    from services.engine.engine import Engine

    engine = Engine(config, device=device)
    # The whole job's input order (drawn from its seed), not the one this slice's seed draws.
    engine.stage.schedule = InputSchedule(len(engine.train.y), config.batch, order_seed)
    return engine


def run_seed_slice(fields: dict, first: int, runs: int, device: str | None = None) -> dict:
    """Runs [first, first + runs) of the job ``fields`` to the slice's own end (a worker task):
    its result and final θ⁰, and its snapshot where it stopped before ``max_ticks``."""
    job = JobConfig.from_dict(fields)
    engine = _slice_engine(job.replace(seed=job.seed + first, seeds=runs), job.seed, device)
    result = engine.run()
    snapshot = engine.snapshot() if engine.tick < job.max_ticks else None
    return {"result": result, "theta0": engine.theta0.copy(), "snapshot": snapshot,
            "device": str(getattr(engine.model, "device", "cpu"))}


def continue_seed_slice(fields: dict, first: int, runs: int, ticks: int, snapshot: dict,
                        device: str | None = None) -> dict:
    """A slice that stopped early, continued from its snapshot to tick ``ticks`` (a worker task)."""
    job = JobConfig.from_dict(fields)
    config = job.replace(seed=job.seed + first, seeds=runs, max_ticks=ticks, target_accuracy=None, target_cost=None)
    engine = _slice_engine(config, job.seed, device)
    engine.restore(snapshot)
    result = engine.run()
    return {"result": result, "theta0": engine.theta0.copy()}


def _job_history(parts: list[JobResult], ticks: int, eval_every: int) -> list[EvalPoint]:
    """The whole job's evaluations: each tick the job evaluated at, every slice's runs side by side."""
    def kept(history):
        return [p for p in history if p.tick % eval_every == 0 or p.tick == ticks]

    histories = [kept(r.history) for r in parts]
    if len({tuple(p.tick for p in h) for h in histories}) != 1:
        return []  # slices evaluated at different ticks (cannot happen for a splittable job)
    return [EvalPoint(points[0].tick, points[0].c0_measurements, np.concatenate([p.cost for p in points]),
                      np.concatenate([p.accuracy for p in points]))
            for points in zip(*histories)]


def run_split(config: JobConfig, workers: int, device: str | None = None,
              console: Console | None = None) -> tuple[JobResult, np.ndarray]:
    """``config`` with its seeds split into contiguous slices over ``workers`` worker processes
    (``services.studies.workers``); returns the whole job's result and final θ⁰, equal to one
    process's but for the wall time. ``console`` shows a bar over the runs (None: none)."""
    from services.studies.workers import WorkerPool, check_workers

    check_workers(workers)
    check_splittable(config)
    slices = seed_slices(config.seeds, workers)
    fields = config.to_dict()
    labels = [f"runs {a}–{a + n - 1} (seeds {config.seed + a}–{config.seed + a + n - 1})" for a, n in slices]
    bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                   TimeElapsedColumn(), console=console, disable=console is None)
    start = time.perf_counter()
    with bar, WorkerPool(len(slices)) as pool:
        task = bar.add_task("training", total=config.seeds)
        parts: list[dict] = [{}] * len(slices)
        for i, part in pool.run(run_seed_slice, [(fields, a, n, device) for a, n in slices], labels):
            parts[i] = part
            bar.advance(task, slices[i][1])
        ticks = max(p["result"].ticks for p in parts)
        early = [i for i, p in enumerate(parts) if p["result"].ticks < ticks]
        tasks = [(fields, *slices[i], ticks, parts[i]["snapshot"], device) for i in early]
        for j, part in pool.run(continue_seed_slice, tasks, [labels[i] + ", continued" for i in early]):
            first = parts[early[j]]["result"]
            parts[early[j]] = part
            # Solutions were found (and C₀ counted to them) before the slice stopped.
            part["result"].history[:0] = first.history
    device_used = parts[0].get("device") or next(p["device"] for p in parts if "device" in p)
    results = [p["result"] for p in parts]
    merged = JobResult(config, results[0].num_params, ticks, max(r.c0_measurements for r in results),
                       np.concatenate([r.solved for r in results]),
                       np.concatenate([r.ticks_to_solution for r in results]),
                       np.concatenate([r.c0_to_solution for r in results]),
                       np.concatenate([r.final_cost for r in results]),
                       np.concatenate([r.final_accuracy for r in results]),
                       time.perf_counter() - start, _job_history(results, ticks, config.eval_every),
                       np.concatenate([r.diverged_at if r.diverged_at is not None
                                       else np.full(len(r.solved), -1) for r in results]),
                       {"device": device_used})
    return merged, np.concatenate([p["theta0"] for p in parts])
