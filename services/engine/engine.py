"""The in-process engine: one PMGD job in virtual time, deterministic and fast.

It wires the very classes the cluster runs, the parameter nodes (``pmgd_node.node``) and
the chip's output stage (``services.broadcaster.output_stage``), through the in-memory
transport. One perturbed tick t is:

    if the output stage needs C₀:  C₀ ← C(θ⁰)               (a C₀ measurement, discrete only)
    θ ← gather θ⁰ + θ̃[t] from the nodes;  C̃ ← extract(C(θ))   (a perturbed tick)
    publish (C̃, t) to the nodes, which integrate and update on their own schedule

With ``timing = "async"`` the transport is ``AsyncTransport``: each node ticks on its own
(drifting) clock, "gather" reads the newest shard of each node that has reached the
broadcaster and C̃ reaches each node tagged with that shard's tick; the engine's loop is the
same. Evaluation always reads the θ⁰ the nodes hold (``node_static``), not the broadcaster's.

Every ``eval_every`` ticks θ⁰ is scored on the evaluation set (the whole task for parity,
the held-out split for the CNNs) and the stopping rule is checked per run. A run diverges
when its C̃ is not finite (checked every tick) or, at an evaluation, its cost is not finite
or its θ⁰ leaves ±``DIVERGENCE_BOUND``; it is then over, reported with that tick, and a job
whose every run is over (solved or diverged) stops at once. All S runs of a
multi-seed job advance together, vectorised along the leading axis of every array.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pmgd_node.config import ConfigError, JobConfig
from pmgd_node.node import ParameterNode
from pmgd_node.sharding import shard_ranges
from services.broadcaster.output_stage import OutputStage
from services.evaluator.data import Dataset, load
from services.evaluator.models import Model, job_model

from .async_transport import AsyncTransport
from .transport import InMemoryTransport

_INIT_STREAM = 0x494E4954  # "INIT"

# Paper §8: realistic perturbation periods τ_p of emerging hardware, seconds.
HW_TIMESCALES = {"HW1": 1e-3, "HW2": 1e-6, "HW3": 1e-8, "HW4": 1e-9}


def initial_parameters(model: Model, config: JobConfig) -> np.ndarray:
    """θ⁰ at tick 0, (S, P): run r draws from its own seed, seed + r, alone."""
    rows = [model.init(np.random.default_rng([config.seed + r, _INIT_STREAM]), 1)[0] for r in range(config.seeds)]
    return np.stack(rows).astype(model.dtype, copy=False)


# |θ⁰| beyond this counts as divergence: far above any weight a trained network of these
# tasks holds (|θ⁰| ≲ 10), far below overflow, so a run blowing up stops before its numbers go.
DIVERGENCE_BOUND = 1e6


def diverged(point: EvalPoint, theta0: np.ndarray) -> np.ndarray:
    """Per run: has it diverged by this evaluation? Its cost is not finite, or its θ⁰ is not
    finite or leaves ±DIVERGENCE_BOUND."""
    with np.errstate(invalid="ignore"):
        out_of_bounds = ~(np.abs(theta0) <= DIVERGENCE_BOUND).all(axis=-1)  # NaN compares False
    return out_of_bounds | ~np.isfinite(point.cost)


def note_divergence(t_div: np.ndarray, stage: OutputStage, point: EvalPoint | None = None,
                    theta0: np.ndarray | None = None) -> None:
    """Record in ``t_div`` (per run, −1 until it diverges) the runs whose C̃ went non-finite in
    ``stage`` and, at an evaluation, those :func:`diverged` finds."""
    new = (t_div < 0) & (stage.diverged_at >= 0)
    t_div[new] = stage.diverged_at[new]
    if point is not None:
        new = (t_div < 0) & diverged(point, theta0)
        t_div[new] = point.tick


def runs_over(t_sol: np.ndarray, t_div: np.ndarray, has_rule: bool) -> bool:
    """Is every run over: solved (when the job has a stopping rule) or diverged?"""
    return bool(np.all(((t_sol >= 0) if has_rule else False) | (t_div >= 0)))


def finite_median(values) -> float | None:
    """Median over the runs whose value is finite (a diverged run's is not; None counts as
    not finite); None when no run's is."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else None


def meets_target(config: JobConfig, point: EvalPoint) -> np.ndarray:
    """Per run: does this evaluation meet the job's stopping rule (accuracy and/or cost)?"""
    ok = np.ones(len(point.cost), dtype=bool)
    if config.target_accuracy is not None:
        ok &= point.accuracy >= config.target_accuracy - 1e-12
    if config.target_cost is not None:
        ok &= point.cost <= config.target_cost
    return ok


@dataclass
class EvalPoint:
    tick: int
    c0_measurements: int
    cost: np.ndarray  # (S,) on the evaluation set
    accuracy: np.ndarray  # (S,)


@dataclass
class EngineResult:
    config: JobConfig
    num_params: int
    ticks: int  # perturbed ticks executed
    c0_measurements: int
    solved: np.ndarray  # (S,) bool
    ticks_to_solution: np.ndarray  # (S,) perturbed ticks, −1 where unsolved
    c0_to_solution: np.ndarray  # (S,) C₀ measurements up to the solution, −1 where unsolved
    final_cost: np.ndarray
    final_accuracy: np.ndarray
    wall_time: float
    history: list[EvalPoint] = field(default_factory=list)
    diverged_at: np.ndarray | None = None  # (S,) tick at which each run diverged, −1 where it did not


class Engine:
    """Runs one job (all its seeds) on in-process nodes."""

    def __init__(self, config: JobConfig, model: Model | None = None, train: Dataset | None = None,
                 evalset: Dataset | None = None, device: str | None = None):
        self.config = config
        self.model = model or job_model(config, device=device)
        if train is None:
            train = load(config.task, config.data_dir, "train")
        if evalset is None:
            evalset = train if config.task.startswith("parity") else load(config.task, config.data_dir, "test")
        if config.eval_samples:
            evalset = Dataset(evalset.x[: config.eval_samples], evalset.y[: config.eval_samples],
                              evalset.num_classes, evalset.name)
        self.train, self.evalset = train, evalset
        P = self.model.num_params
        if config.nodes > P:
            raise ConfigError("nodes", f"must be in [1, {P}] for a {P}-parameter network; got {config.nodes}")
        theta0 = initial_parameters(self.model, config)
        self.nodes = [ParameterNode(config, P, a, b, theta0[:, a:b]) for a, b in shard_ranges(P, config.nodes)]
        transport = AsyncTransport if config.timing == "async" else InMemoryTransport
        self.transport = transport(self.nodes, config)
        self.stage = OutputStage(config, self.model, train)
        self._eval_batch = self.model.prepare(evalset.x, evalset.y)
        self.tick = 0
        # Per run: the tick (and C₀ count) at which the stopping rule was first met, −1 before.
        self.t_sol = np.full(config.seeds, -1, dtype=np.int64)
        self.c0_sol = np.full(config.seeds, -1, dtype=np.int64)
        self.t_div = np.full(config.seeds, -1, dtype=np.int64)  # the tick each run diverged at, −1 before

    @property
    def theta0(self) -> np.ndarray:
        """θ⁰ the nodes hold now (evaluation, diagnostics); async, the broadcaster may hold older shards."""
        return self.transport.node_static()

    def step(self) -> np.ndarray:
        """Execute one perturbed tick (and the C₀ measurement it needs); returns C̃, (S,)."""
        t = self.tick
        self.stage.begin_tick(t)
        theta0 = self.transport.gather_static() if self.stage.needs_theta0 else None
        c_tilde = self.stage.cost_variation(theta0, self.transport.gather_effective(t))
        self.transport.publish(c_tilde, t)
        self.tick = t + 1
        return c_tilde

    def snapshot(self) -> dict[str, np.ndarray]:
        """The job's state at a tick boundary, as arrays for an ``.npz`` (see :meth:`restore`)."""
        return {"tick": np.int64(self.tick), "theta0": self.theta0.copy(),
                "gradient": self.transport.gather_gradient().copy(),
                "updates": np.array([n.updates for n in self.transport.nodes], dtype=np.int64),
                "stage": np.array(json.dumps(self.stage.snapshot())),
                "t_sol": self.t_sol.copy(), "c0_sol": self.c0_sol.copy(), "t_div": self.t_div.copy()}

    def restore(self, snap) -> None:
        """Continue from a :meth:`snapshot` (e.g. after the service running the job restarted).

        Exact for sync timing without C̃ in flight (no link delay): the run then matches an
        uninterrupted one bit for bit. C̃ values in flight on delayed links, and async node
        clocks, restart empty.
        """
        theta0, gradient = np.asarray(snap["theta0"]), np.asarray(snap["gradient"])
        for node, updates in zip(self.transport.nodes, np.asarray(snap["updates"])):
            node.restore(theta0[:, node.start:node.stop], gradient[:, node.start:node.stop], int(updates))
        self.tick = int(snap["tick"])
        self.stage.restore(json.loads(str(snap["stage"])), self.tick)
        self.t_sol[:] = snap["t_sol"]
        self.c0_sol[:] = snap["c0_sol"]
        self.t_div[:] = snap["t_div"] if "t_div" in snap else -1

    def evaluate(self) -> EvalPoint:
        # One forward pass for both numbers (models share it in evaluate()).
        cost, accuracy = self.model.evaluate(self.theta0, self._eval_batch)
        return EvalPoint(self.tick, self.stage.c0_measurements, cost, accuracy)

    def _solved(self, point: EvalPoint) -> np.ndarray:
        return meets_target(self.config, point)

    def run(self, on_eval: Callable[[EvalPoint, np.ndarray], None] | None = None) -> EngineResult:
        """Train until every run meets the stopping rule or diverges, or ``max_ticks`` ticks have run.

        ``on_eval(point, solved)`` is called at every check (progress bars, metrics). A run
        whose C̃ goes non-finite ends the job at that tick if it was the last run still going.
        """
        cfg = self.config
        t_sol, c0_sol, t_div, stage = self.t_sol, self.c0_sol, self.t_div, self.stage
        has_rule = cfg.target_accuracy is not None or cfg.target_cost is not None
        history: list[EvalPoint] = []
        start = time.perf_counter()
        point = None

        while self.tick < cfg.max_ticks:
            for _ in range(min(cfg.eval_every, cfg.max_ticks - self.tick)):
                self.step()
                if stage.diverged:
                    note_divergence(t_div, stage)
                    if runs_over(t_sol, t_div, has_rule):
                        break
            point = self.evaluate()
            history.append(point)
            note_divergence(t_div, stage, point, self.theta0)
            if has_rule:
                newly = self._solved(point) & (t_sol < 0) & (t_div < 0)
                t_sol[newly] = point.tick
                c0_sol[newly] = point.c0_measurements
            if on_eval is not None:
                on_eval(point, t_sol >= 0)
            if runs_over(t_sol, t_div, has_rule):
                break
        wall = time.perf_counter() - start
        if point is None:
            point = self.evaluate()
        return EngineResult(cfg, self.model.num_params, self.tick, self.stage.c0_measurements, t_sol >= 0,
                            t_sol, c0_sol, point.cost, point.accuracy, wall, history, t_div.copy())


def _finite_list(values: np.ndarray) -> list:
    """Per-run values for JSON: a diverged run's NaN or ∞ becomes None (JSON has no NaN)."""
    return [float(v) if np.isfinite(v) else None for v in values]


def summarize(result: EngineResult) -> dict:
    """The numbers `pmgd train` prints and writes: quartiles over solved runs, HW projections.

    Final costs and accuracies are medians over the runs whose numbers are finite; a run that
    diverged is counted in ``diverged`` with its tick in ``diverged_at``, never as a NaN median.
    """
    solved = result.solved
    out: dict = {
        "task": result.config.task,
        "network": result.config.network,
        "perturbation": result.config.perturbation,
        "mode": result.config.mode,
        "num_params": result.num_params,
        "runs": int(len(solved)),
        "converged": int(solved.sum()),
        "ticks_run": int(result.ticks),
        "c0_measurements_run": int(result.c0_measurements),
        "final_cost_median": finite_median(result.final_cost),
        "final_accuracy_median": finite_median(result.final_accuracy),
        "final_cost": _finite_list(result.final_cost),  # per run
        "final_accuracy": _finite_list(result.final_accuracy),
        "wall_time_s": result.wall_time,
    }
    if len(solved) > 1:
        out["ticks_to_solution"] = result.ticks_to_solution.tolist()  # per run, −1 where unsolved
    t_div = result.diverged_at if result.diverged_at is not None else np.full(len(solved), -1)
    out["diverged"] = int((t_div >= 0).sum())
    out["diverged_at"] = t_div.tolist()  # per run: the tick it diverged at, −1 where it did not
    if solved.any():
        ticks = result.ticks_to_solution[solved]
        total = ticks + result.c0_to_solution[solved]
        q1, med, q3 = np.percentile(ticks, [25, 50, 75])
        out.update(ticks_to_solution_median=float(med), ticks_to_solution_q1=float(q1),
                   ticks_to_solution_q3=float(q3),
                   c0_to_solution_median=float(np.median(result.c0_to_solution[solved])))
        # Hardware time counts C₀ measurements too (paper Table 1, footnote 3).
        out["projected_solution_time_s"] = {hw: float(np.median(total)) * tau for hw, tau in HW_TIMESCALES.items()}
    else:
        out.update(ticks_to_solution_median=None, ticks_to_solution_q1=None, ticks_to_solution_q3=None,
                   c0_to_solution_median=None, projected_solution_time_s=None)
    return out
