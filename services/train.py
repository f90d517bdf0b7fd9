"""One training job with a progress bar: the body that `pmgd train` and the Python API (``pmgd.train``)
share, and the summary table `pmgd train` prints."""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pmgd_node.config import JobConfig
from pmgd_node.shell.keys import Keys
from services import runtime
from services.chip.job import HW_TIMESCALES, JobResult, finite_median, summarize


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
            started: float | None = None) -> tuple[JobResult, dict, np.ndarray | None]:
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
    """
    started = time.perf_counter() if started is None else started
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
              started: float | None = None, keys: Keys | None = None) -> dict:
    """`pmgd train`: :func:`run_job` with a progress bar, then the summary table; returns the
    summary (what ``--json`` writes). The arguments are :func:`run_job`'s."""
    console = console or Console(stderr=True)
    _, summary, _ = run_job(config, engine=engine, device=device, progress=progress, console=console,
                            cluster=cluster, keys=keys, started=started)
    console.print(summary_table(summary))
    return summary
