"""The chip side of one PMGD job, written once for every runtime (no I/O, no clocks).

A job's chip side is everything that is not a parameter node: set-up (model, data, the
initial θ⁰), the tick (forward pass, C̃ extraction and the C₀ rule, in
:class:`~services.chip.output_stage.OutputStage`), evaluation and the stopping rule,
divergence, the state a checkpoint holds, and the result. The in-process engine drives a
:class:`ChipJob` in virtual time; the broadcaster drives the same object from its sockets.
One perturbed tick t, in either:

    job.begin_tick(t);  C̃[t] = job.cost_variation(θ⁰, θ⁰ + θ̃[t])   (C₀ ← C(θ⁰) first when due)
    then, once tick t is closed (every node has heard C̃[t]):
    if job.evaluation_due(t + 1):  job.record(job.measure(t + 1, θ⁰))

Every ``eval_every`` ticks (and at ``max_ticks``) θ⁰ is scored on the evaluation set (the
whole task for parity, the held-out split for the CNNs) and the stopping rule is checked per
run. A run diverges when its C̃ is not finite (checked every tick) or, at an evaluation, its
cost is not finite or its θ⁰ leaves ±``DIVERGENCE_BOUND``; it is then over, reported with that
tick, and a job whose every run is over (solved or diverged) is evaluated and stops at once.

With a chip (``config.chip``, or a ``remote`` handed in: docs/chip-protocol.md) every forward
pass runs there: the output stage's per-tick costs (:class:`services.chip.client.ChipClient`
``cost``, on the training samples on show) and every evaluation of θ⁰ (``evaluate`` on the
evaluation set's indices, split "test" for a held-out set, "train" where the evaluation set is
the training set: parity, a custom task without test data), because on a real device accuracy
can only be measured on the device. Set-up says hello and checks that the chip's P is the
network's.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from pmgd_node.config import ConfigError, JobConfig
from services.evaluator.data import Dataset, job_data
from services.evaluator.models import Model, job_model

from .output_stage import OutputStage

_INIT_STREAM = 0x494E4954  # "INIT"

# Paper §8: realistic perturbation periods τ_p of emerging hardware, seconds.
HW_TIMESCALES = {"HW1": 1e-3, "HW2": 1e-6, "HW3": 1e-8, "HW4": 1e-9}

# |θ⁰| beyond this counts as divergence: far above any weight a trained network of these
# tasks holds (|θ⁰| ≲ 10), far below overflow, so a run blowing up stops before its numbers go.
DIVERGENCE_BOUND = 1e6


def initial_parameters(model: Model, config: JobConfig) -> np.ndarray:
    """θ⁰ at tick 0, (S, P): run r draws from its own seed, seed + r, alone."""
    rows = [model.init(np.random.default_rng([config.seed + r, _INIT_STREAM]), 1)[0] for r in range(config.seeds)]
    return np.stack(rows).astype(model.dtype, copy=False)


@dataclass
class EvalPoint:
    tick: int
    c0_measurements: int
    cost: np.ndarray  # (S,) on the evaluation set
    accuracy: np.ndarray  # (S,)


@dataclass
class JobResult:
    """What a job did, the same for every runtime."""

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
    details: dict = field(default_factory=dict)  # what only the runtime knows (services/runtime.py)


def diverged(point: EvalPoint, theta0: np.ndarray) -> np.ndarray:
    """Per run: has it diverged by this evaluation? Its cost is not finite, or its θ⁰ is not
    finite or leaves ±DIVERGENCE_BOUND."""
    with np.errstate(invalid="ignore"):
        out_of_bounds = ~(np.abs(theta0) <= DIVERGENCE_BOUND).all(axis=-1)  # NaN compares False
    return out_of_bounds | ~np.isfinite(point.cost)


def meets_target(config: JobConfig, point: EvalPoint) -> np.ndarray:
    """Per run: does this evaluation meet the job's stopping rule (accuracy and/or cost)?"""
    ok = np.ones(len(point.cost), dtype=bool)
    if config.target_accuracy is not None:
        ok &= point.accuracy >= config.target_accuracy - 1e-12
    if config.target_cost is not None:
        ok &= point.cost <= config.target_cost
    return ok


def finite_median(values) -> float | None:
    """Median over the runs whose value is finite (a diverged run's is not; None counts as
    not finite); None when no run's is."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else None


class ChipJob:
    """Set-up, tick, evaluation, stopping, state and result of one job (all its seeds).

    ``remote`` (optional) runs the forward passes elsewhere: anything with ``hello()``,
    ``cost(theta, indices)`` and ``evaluate(theta, indices, split)``, in practice a
    :class:`services.chip.client.ChipClient` (the broadcaster's ``evaluator``). Without one, a
    job whose ``config.chip`` names a chip gets a ChipClient of its own, authenticated with
    ``chip_keys`` (CurveZMQ, optional) and naming the job ``job_id`` to the chip (default: a
    fresh id); :meth:`close` closes it.
    """

    def __init__(self, config: JobConfig, model: Model | None = None, train: Dataset | None = None,
                 evalset: Dataset | None = None, device: str | None = None, remote=None, chip_keys=None,
                 job_id: str = ""):
        self.config = config
        self.model = model or job_model(config, device=device)
        if train is None:
            train = job_data(config, "train")
        if evalset is None:
            evalset = train if config.task.startswith("parity") else job_data(config, "test")
        # The chip is asked for the split the evaluation set came from: the training set itself
        # (parity, a custom task without test data) or the held-out one.
        self.eval_split = "train" if evalset is train or (evalset.x is train.x and evalset.y is train.y) else "test"
        if config.eval_samples:
            evalset = Dataset(evalset.x[: config.eval_samples], evalset.y[: config.eval_samples],
                              evalset.num_classes, evalset.name)
        self.train, self.evalset = train, evalset
        self.num_params = P = self.model.num_params
        if config.nodes > P:
            raise ConfigError("nodes", f"must be in [1, {P}] for a {P}-parameter network; got {config.nodes}")
        self._own_remote = remote is None and bool(config.chip)
        if self._own_remote:
            from .client import ChipClient  # sockets only for a job that has a chip

            remote = ChipClient(config.chip, job_id or f"job-{uuid.uuid4().hex[:12]}", config,
                                timeout_s=config.chip_timeout, retries=config.chip_retries, keys=chip_keys)
        self.remote = remote
        self.eval_indices = np.arange(len(evalset), dtype=np.int64)
        if remote is not None:
            try:
                self._check_chip(remote.hello(), train)
            except BaseException:
                self.close()
                raise
        self.stage = OutputStage(config, self.model, train, remote)
        self.eval_batch = self.model.prepare(evalset.x, evalset.y)
        self.has_rule = config.target_accuracy is not None or config.target_cost is not None
        S = config.seeds
        # Per run: the tick (and C₀ count) at which the stopping rule was first met, −1 before.
        self.t_sol = np.full(S, -1, dtype=np.int64)
        self.c0_sol = np.full(S, -1, dtype=np.int64)
        self.t_div = np.full(S, -1, dtype=np.int64)  # the tick each run diverged at, −1 before
        self.history: list[EvalPoint] = []
        self._over = False  # every run solved or diverged: recomputed when t_sol or t_div change

    def _check_chip(self, info, train: Dataset) -> None:
        """The chip must run this job's network on this job's data: its P and sample counts."""
        where = getattr(self.remote, "endpoint", "the chip")
        if info.params != self.num_params:
            raise ConfigError("chip", f"{where} ({info.name}) has P={info.params} parameters but the network of "
                                      f"this job ({self.model.name}) has {self.num_params}")
        if info.samples.get("train") != len(train):
            raise ConfigError("chip", f"{where} ({info.name}) holds {info.samples.get('train')} training samples but "
                                      f"this job's training set has {len(train)}: the indices would name other samples")
        if info.samples.get(self.eval_split, 0) < len(self.eval_indices):
            raise ConfigError("chip", f"{where} ({info.name}) holds {info.samples.get(self.eval_split)} "
                                      f"{self.eval_split} samples; this job evaluates on {len(self.eval_indices)}")

    def close(self) -> None:
        """Close the chip client this job made for itself (a ``remote`` handed in stays open)."""
        if self._own_remote and self.remote is not None:
            self.remote.close()

    def initial_theta0(self) -> np.ndarray:
        return initial_parameters(self.model, self.config)

    # --- the tick ---------------------------------------------------------------------------
    def begin_tick(self, t: int) -> bool:
        """Start tick t (its input); True when :meth:`cost_variation` needs θ⁰ (a C₀ may be
        due), so that a runtime gathers θ⁰ only then."""
        self.stage.begin_tick(t)
        return self.stage.needs_theta0

    def cost_variation(self, theta0: np.ndarray | None, effective: np.ndarray) -> np.ndarray:
        """C̃ of the tick begun, (S,), from its weights: θ⁰ (for the C₀ rule; None when
        :meth:`begin_tick` said it is not needed) and θ⁰ + θ̃[t]."""
        c_tilde = self.stage.cost_variation(theta0, effective)
        if self.stage.diverged:
            new = (self.t_div < 0) & (self.stage.diverged_at >= 0)
            if new.any():
                self.t_div[new] = self.stage.diverged_at[new]
                self._update_over()
        return c_tilde

    @property
    def over(self) -> bool:
        """Is every run over: solved (when the job has a stopping rule) or diverged?"""
        return self._over

    def _update_over(self) -> None:
        # Kept as a flag: the engine asks every tick, and the arrays change only at events.
        self._over = bool(np.all(((self.t_sol >= 0) if self.has_rule else False) | (self.t_div >= 0)))

    # --- evaluation and stopping --------------------------------------------------------------
    def evaluation_due(self, t: int) -> bool:
        """After t ticks: every ``eval_every``, at the budget, and when every run is over."""
        return t > 0 and (t % self.config.eval_every == 0 or t >= self.config.max_ticks or self.over)

    def measure(self, t: int, theta0: np.ndarray) -> EvalPoint:
        """Score θ⁰ on the evaluation set after t ticks (one forward pass for both numbers), on
        the chip when the job has one."""
        if self.remote is not None:
            cost, accuracy = self.remote.evaluate(theta0, self.eval_indices, self.eval_split)
        else:
            cost, accuracy = self.model.evaluate(theta0, self.eval_batch)
        return EvalPoint(t, self.stage.c0_measurements, cost, accuracy)

    def record(self, point: EvalPoint, theta0: np.ndarray) -> None:
        """Keep an evaluation, note runs that diverged and runs that met the stopping rule."""
        self.history.append(point)
        new = (self.t_div < 0) & diverged(point, theta0)
        self.t_div[new] = point.tick
        if self.has_rule:
            newly = meets_target(self.config, point) & (self.t_sol < 0) & (self.t_div < 0)
            self.t_sol[newly] = point.tick
            self.c0_sol[newly] = point.c0_measurements
        self._update_over()

    # --- state ------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything the chip side must keep to resume at this tick boundary."""
        return {"stage": self.stage.snapshot(), "t_sol": self.t_sol.copy(), "c0_sol": self.c0_sol.copy(),
                "t_div": self.t_div.copy(), "history": len(self.history)}

    def restore(self, state: dict, tick: int) -> None:
        """Back to a :meth:`state` taken at ``tick`` (evaluations after it are dropped)."""
        self.stage.restore(state["stage"], tick)
        self.t_sol[:] = state["t_sol"]
        self.c0_sol[:] = state["c0_sol"]
        self.t_div[:] = state["t_div"] if "t_div" in state else -1  # absent from older checkpoints
        if "history" in state:
            del self.history[int(state["history"]):]
        self._update_over()

    def result(self, ticks: int, theta0: np.ndarray, wall_time: float) -> JobResult:
        """The job's result after ``ticks`` ticks (its last evaluation, or one of θ⁰ now)."""
        last = self.history[-1] if self.history else self.measure(ticks, theta0)
        return JobResult(self.config, self.num_params, ticks, self.stage.c0_measurements, self.t_sol >= 0,
                         self.t_sol.copy(), self.c0_sol.copy(), last.cost, last.accuracy, wall_time,
                         list(self.history), self.t_div.copy())


def _finite_list(values: np.ndarray) -> list:
    """Per-run values for JSON: a diverged run's NaN or ∞ becomes None (JSON has no NaN)."""
    return [float(v) if np.isfinite(v) else None for v in values]


def summarize(result: JobResult) -> dict:
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
        out["c0_to_solution"] = result.c0_to_solution.tolist()
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
