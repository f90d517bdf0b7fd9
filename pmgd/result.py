"""What :func:`pmgd.train` returns: a job's summary, configuration, final θ⁰ and learning
curves, with tables shaped for pandas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pmgd_node.config import JobConfig

if TYPE_CHECKING:  # numpy and the chip job are loaded only once a job has run
    import numpy as np

    from services.chip.job import EvalPoint, JobResult


def _number(value) -> float:
    """A per-run number as a plain float (a diverged run's NaN stays NaN: pandas reads it as missing)."""
    return float(value)


def _tick(value) -> int | None:
    """A per-run tick from the engine's arrays, where −1 means "never": None then."""
    value = int(value)
    return None if value < 0 else value


@dataclass(frozen=True, repr=False)
class Result:
    """One finished job (all its seeds).

    ``summary``: the dict `pmgd train --json` writes for the same job (medians, quartiles,
    hardware projections, ``wall_time_s`` and ``training_time_s``, ``engine``, ``config``; on
    the cluster also its job id, epochs, checkpoints, drop counts, θ⁰ and θ⁰ trail).
    ``config``: the :class:`~pmgd_node.config.JobConfig` that ran. ``theta0``: the final θ⁰,
    a numpy array (runs, P); run r's parameters are row r (None only if a runtime sent none).
    ``history``: one :class:`~services.chip.job.EvalPoint` per evaluation (every
    ``eval_every`` ticks and at the end), each with ``tick``, ``c0_measurements`` and per-run
    ``cost`` and ``accuracy`` arrays (runs,); on the cluster, the evaluations the broadcaster
    reported while the job ran. ``job_result``: the runtime's
    :class:`~services.chip.job.JobResult` (per-run arrays, ``details``).

    Run r of a job started from seed s has seed s + r (pmgd_node/config.py).
    """

    summary: dict
    config: JobConfig
    theta0: np.ndarray | None
    history: list[EvalPoint] = field(default_factory=list)
    job_result: JobResult | None = None

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (run, evaluation), evaluations in order, runs within each:
        ``run``, ``seed``, ``tick``, ``c0_measurements``, ``cost``, ``accuracy``.

        Plain Python numbers, ready for ``pandas.DataFrame(result.rows())``; a diverged
        run's cost is NaN (or ∞) from its divergence on.
        """
        seed = self.config.seed
        return [{"run": r, "seed": seed + r, "tick": int(point.tick), "c0_measurements": int(point.c0_measurements),
                 "cost": _number(cost), "accuracy": _number(accuracy)}
                for point in self.history
                for r, (cost, accuracy) in enumerate(zip(point.cost, point.accuracy))]

    def runs(self) -> list[dict[str, Any]]:
        """One dict per run: ``run``, ``seed``, ``solved`` (met the stopping rule),
        ``ticks_to_solution`` and ``c0_to_solution`` (perturbed ticks and C₀ measurements up
        to the evaluation that first met it; None when it never did), ``diverged_at`` (the
        tick the run diverged at; None when it did not), ``final_cost`` and
        ``final_accuracy`` (at the last evaluation; NaN for a diverged run).
        """
        job = self.job_result
        if job is None:
            raise ValueError("this Result holds no per-run results (job_result is None)")
        S = len(job.solved)
        diverged_at = job.diverged_at if job.diverged_at is not None else [-1] * S
        seed = self.config.seed
        return [{"run": r, "seed": seed + r, "solved": bool(job.solved[r]),
                 "ticks_to_solution": _tick(job.ticks_to_solution[r]), "c0_to_solution": _tick(job.c0_to_solution[r]),
                 "diverged_at": _tick(diverged_at[r]), "final_cost": _number(job.final_cost[r]),
                 "final_accuracy": _number(job.final_accuracy[r])}
                for r in range(S)]

    def to_pandas(self):
        """:meth:`rows` as a ``pandas.DataFrame`` (one row per run and evaluation).

        Raises ImportError saying how to install pandas when it is not installed (it is not
        a dependency of this package).
        """
        try:
            import pandas
        except ImportError:
            raise ImportError("Result.to_pandas() needs pandas, which is not installed: pip install pandas "
                              "(or use result.rows(), a list of dicts)") from None
        return pandas.DataFrame(self.rows(), columns=["run", "seed", "tick", "c0_measurements", "cost", "accuracy"])

    def table(self):
        """The summary table `pmgd train` prints, as a ``rich.table.Table`` (``rich.print(result.table())``)."""
        from services.train import summary_table

        return summary_table(self.summary)

    def __repr__(self) -> str:
        s = self.summary
        median = s.get("ticks_to_solution_median")
        solved = "" if median is None else f", median {median:,.0f} ticks to target"
        accuracy = s.get("final_accuracy_median")
        final = "" if accuracy is None else f", final accuracy {100 * accuracy:.1f} %"
        diverged = f", {s['diverged']} diverged" if s.get("diverged") else ""
        return (f"<pmgd.Result {s.get('task')} {s.get('perturbation')} on {s.get('engine')}: "
                f"{s.get('converged')}/{s.get('runs')} converged{solved}{diverged}{final}>")

