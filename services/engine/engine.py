"""The in-process engine: one PMGD job in virtual time, deterministic and fast.

It wires the very classes the cluster runs, the parameter nodes (``pmgd_node.node``) and
the chip side of the job (``services.chip.job.ChipJob``, whose output stage extracts C̃),
through the in-memory transport. One perturbed tick t is:

    job.begin_tick(t);  θ⁰ ← gather from the nodes if a C₀ may be due (discrete only)
    θ ← gather θ⁰ + θ̃[t] from the nodes;  C̃ ← job.cost_variation(θ⁰, θ)   (C₀ ← C(θ⁰) first when due)
    publish (C̃, t) to the nodes, which integrate and update on their own schedule
    evaluate θ⁰ and check the stopping rule when ``job.evaluation_due(t + 1)``

With ``timing = "async"`` the transport is ``AsyncTransport``: each node ticks on its own
(drifting) clock, "gather" reads the newest shard of each node that has reached the
broadcaster and C̃ reaches each node tagged with that shard's tick; the engine's loop is the
same. Evaluation always reads the θ⁰ the nodes hold (``node_static``), not the broadcaster's.
All S runs of a multi-seed job advance together, vectorised along the leading axis of every
array. Evaluation, stopping, divergence and results are the chip job's (services/chip/job.py),
the same code the broadcaster runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np

from pmgd_node.config import JobConfig
from pmgd_node.node import ParameterNode
from pmgd_node.sharding import shard_ranges
from services.chip.job import ChipJob, EvalPoint, JobResult
from services.evaluator.data import Dataset
from services.evaluator.models import Model

from .async_transport import AsyncTransport
from .transport import InMemoryTransport


class Engine:
    """Runs one job (all its seeds) on in-process nodes."""

    def __init__(self, config: JobConfig, model: Model | None = None, train: Dataset | None = None,
                 evalset: Dataset | None = None, device: str | None = None, chip_keys=None):
        # With config.chip the chip job runs every forward pass on that chip (docs/chip-protocol.md),
        # reached with chip_keys (CurveZMQ, optional).
        self.config = config
        self.job = ChipJob(config, model, train, evalset, device=device, chip_keys=chip_keys)
        self.model, self.stage = self.job.model, self.job.stage
        self.train, self.evalset, self.eval_batch = self.job.train, self.job.evalset, self.job.eval_batch
        theta0 = self.job.initial_theta0()
        P = self.job.num_params
        self.nodes = [ParameterNode(config, P, a, b, theta0[:, a:b]) for a, b in shard_ranges(P, config.nodes)]
        transport = AsyncTransport if config.timing == "async" else InMemoryTransport
        self.transport = transport(self.nodes, config)
        self.tick = 0

    @property
    def theta0(self) -> np.ndarray:
        """θ⁰ the nodes hold now (evaluation, diagnostics); async, the broadcaster may hold older shards."""
        return self.transport.node_static()

    @property
    def t_sol(self) -> np.ndarray:
        return self.job.t_sol

    def step(self) -> np.ndarray:
        """Execute one perturbed tick (and the C₀ measurement it needs); returns C̃, (S,)."""
        t = self.tick
        theta0 = self.transport.gather_static() if self.job.begin_tick(t) else None
        c_tilde = self.job.cost_variation(theta0, self.transport.gather_effective(t))
        self.transport.publish(c_tilde, t)
        self.tick = t + 1
        return c_tilde

    def snapshot(self) -> dict[str, np.ndarray]:
        """The job's state at a tick boundary, as arrays for an ``.npz`` (see :meth:`restore`)."""
        chip = self.job.state()
        return {"tick": np.int64(self.tick), "theta0": self.theta0.copy(),
                "gradient": self.transport.gather_gradient().copy(),
                "updates": np.array([n.updates for n in self.transport.nodes], dtype=np.int64),
                "stage": np.array(json.dumps(chip["stage"])),
                "t_sol": chip["t_sol"], "c0_sol": chip["c0_sol"], "t_div": chip["t_div"]}

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
        chip = {"stage": json.loads(str(snap["stage"])), "t_sol": snap["t_sol"], "c0_sol": snap["c0_sol"]}
        if "t_div" in snap:
            chip["t_div"] = snap["t_div"]
        self.job.restore(chip, self.tick)

    def evaluate(self) -> EvalPoint:
        """θ⁰ scored now, not recorded (progress lines, diagnostics)."""
        return self.job.measure(self.tick, self.theta0)

    def run(self, on_eval: Callable[[EvalPoint, np.ndarray], None] | None = None) -> JobResult:
        """Train until every run meets the stopping rule or diverges, or ``max_ticks`` ticks have run.

        ``on_eval(point, solved)`` is called at every check (progress bars, metrics).
        """
        job = self.job
        start = time.perf_counter()
        while self.tick < self.config.max_ticks and not job.over:
            self.step()
            if job.evaluation_due(self.tick):
                theta0 = self.theta0
                point = job.measure(self.tick, theta0)
                job.record(point, theta0)
                if on_eval is not None:
                    on_eval(point, job.t_sol >= 0)
        return job.result(self.tick, self.theta0, time.perf_counter() - start)
