"""One job on the broadcaster: its chip job (services/chip/job.py) fed by the nodes' shards,
with the cluster's epochs, checkpoints and rollback (no I/O).

The broadcaster service feeds this class decoded messages and sends what it returns. Per
tick t (sync mode):

    every shard's Weights(t) is in      →  θ⁰ view updated from the shards that changed
      (uplink "replica": every shard's Digest(t), θ⁰ when it changed; θ⁰ + θ̃[t] regenerated here)
    chip.evaluation_due(t)              →  chip.measure(t, θ⁰), chip.record (stopping, divergence)
    chip.begin_tick(t); C̃[t] = chip.cost_variation(θ⁰, θ⁰ + θ̃[t])  →  CostVariation(t)

the same calls on the same object the in-process engine makes, so the trajectories agree
bit for bit.

Fault tolerance: every ``checkpoint_every`` ticks each node sends its whole state at the
tick boundary; once all shards of one boundary are in, that boundary is the job's
checkpoint (with the output stage's state and the history up to it). After a node is lost
and replaced, or after a broadcaster restart, every shard restarts from that checkpoint
under a new ``epoch``: PMGD is deterministic given (config, tick), so the replay reproduces
the trajectory the job would have had without the fault.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

import numpy as np

from pmgd_node import protocol as p
from pmgd_node.config import JobConfig
from pmgd_node.node import shard_perturbation
from pmgd_node.perturbation import make_perturbation
from pmgd_node.sharding import shard_ranges
from pmgd_node.shell.keys import Keys
from services.chip.client import ChipClient
from services.chip.job import ChipJob, EvalPoint, JobResult
from services.state_file import load_state, save_state

# Ticks a node may run ahead of the broadcaster beyond its clock drift (async phases, a node
# that restarted from a newer shard checkpoint); far above what a real cluster shows.
AHEAD_SLACK = 1024

_EMPTY = {"pending_arrival": np.zeros(0, np.int64), "pending_tag": np.zeros(0, np.int64)}


class JobRun:
    def __init__(self, job_id: str, config: JobConfig, device: str | None = None, evaluator: str = "",
                 evaluator_keys: Keys | None = None, chip_keys: Keys | None = None):
        if config.timing == "async" and config.tick_period <= 0:
            raise ValueError("job config field 'tick_period': timing 'async' on the cluster needs a clock: "
                             "a tick period > 0 seconds")
        self.asynchronous = config.timing == "async"
        self.id, self.config = job_id, config
        # evaluator: endpoint of ``pmgd evaluator``, a chip (docs/chip-protocol.md) that runs the
        # forward passes and evaluations, authenticated with ``evaluator_keys``. A job's own
        # ``config.chip`` takes precedence: its ChipJob reaches that chip with ``chip_keys``.
        remote = None
        if evaluator and not config.chip:
            remote = ChipClient(evaluator, job_id, config, timeout_s=config.chip_timeout,
                                retries=config.chip_retries, keys=evaluator_keys)
        try:
            self.chip = ChipJob(config, device=device, remote=remote, chip_keys=chip_keys, job_id=job_id)
        except BaseException:
            if remote is not None:
                remote.close()
            raise
        self._remote = remote
        self.model, self.stage = self.chip.model, self.chip.stage
        self.num_params = self.chip.num_params
        self.shards = shard_ranges(self.num_params, config.nodes)
        theta0 = self.chip.initial_theta0()
        self.static = theta0.copy()
        self.effective = np.empty_like(theta0)
        self.epoch = 0
        self.tick = 0
        self.have: set[int] = set()
        self.held = np.full(config.nodes, -1, dtype=np.int64)  # async: node tick of the newest shard held
        self.held_at = np.zeros(config.nodes, dtype=np.int64)  # broadcaster tick at which it arrived
        self.trail = hashlib.sha256()  # chained hash of θ⁰ at the start of every tick
        self._partial: dict[int, dict[int, p.Checkpoint]] = {}  # shard states of unfinished boundaries
        self._stage_at: dict[int, dict] = {}  # broadcaster-side state at those boundaries
        self.checkpoints_taken = 0
        self.shard_checkpoints: dict[int, p.Checkpoint] = {}  # async: each shard's newest state
        self.trail_valid = True  # False after a restart from disk (the chain is not persisted)
        self.checkpoint = self._boundary(0, [self._shard_state(k, theta0, np.zeros_like(theta0), 0)
                                             for k in range(len(self.shards))])
        self.started = time.perf_counter()
        self.run_started: float | None = None  # first assignment: the ticks start (throughput)
        self.finished = False
        # The replica uplink (sync, ``uplink`` "replica"; docs/cluster.md): nodes send θ⁰ when it
        # changed and its checksum every tick; θ̃[t] of every shard is regenerated here by the
        # nodes' own code (pmgd_node.node.shard_perturbation), so θ⁰ + θ̃ is what they would send.
        self.replica = p.replica_uplink(config)
        self.checksums: list[str | None] = [None] * len(self.shards)  # of each shard's θ⁰ replica
        self.resync_streak = np.zeros(len(self.shards), dtype=np.int64)  # refused digests in a row
        self.resyncs: list[tuple[int, int]] = []  # (tick, shard) of every resync asked for
        # Bytes the nodes sent on the weights link (the ones carrying θ⁰ apart) and C̃ published
        # (each node receives one copy), counted by the service: the summary reports them.
        self.uplink_bytes = self.uplink_messages = self.uplink_state_bytes = self.uplink_state_messages = 0
        self.downlink_bytes = 0
        # Seconds in ``advance`` (forward passes, θ̃ for the replica, the trail, evaluations) and
        # waiting for the shards (from one C̃ out to the last shard of the next tick in), per job.
        self.compute_s = self.gather_s = 0.0
        self._theta_tilde = []
        if self.replica:
            seeds = config.seed + np.arange(config.seeds)
            shared = make_perturbation(config.perturbation, self.num_params, seeds, config.amplitude, config.fm_band,
                                       theta0.dtype)
            self._theta_tilde = [shard_perturbation(config, self.num_params, a, b, theta0.dtype, shared, keep=1)
                                 for a, b in self.shards]

    # --- checkpoints --------------------------------------------------------------------------
    def _shard_state(self, k: int, theta0, gradient, updates: int, pending: dict | None = None) -> dict:
        a, b = self.shards[k]
        state = {"theta0": np.array(theta0[:, a:b] if theta0.shape[1] == self.num_params else theta0),
                 "gradient": np.array(gradient[:, a:b] if gradient.shape[1] == self.num_params else gradient),
                 "updates": updates}
        state.update(pending or dict(_EMPTY, pending_value=np.zeros((0, self.config.seeds))))
        return state

    @property
    def history(self) -> list[EvalPoint]:
        return self.chip.history

    @property
    def t_sol(self) -> np.ndarray:
        return self.chip.t_sol

    def _boundary(self, tick: int, shards: list[dict]) -> dict:
        return {"tick": tick, "shards": shards, "chip": self.chip.state(), "trail": self.trail.copy()}

    def _too_far_ahead(self, tick: int) -> bool:
        """A tick no node of this job can have reached yet: its clock runs at most 1 + drift
        times the broadcaster's, from at most the checkpoint it started at. Such a message (a
        stranger's, or a corrupted one) would otherwise pin a shard: every real message after it
        would look stale."""
        return tick > self.tick + AHEAD_SLACK + 2 * self.config.drift * self.tick

    def on_checkpoint(self, c: p.Checkpoint) -> bool:
        """Collect one shard's state; True when a boundary is complete and became the checkpoint."""
        if c.epoch != self.epoch or not 0 <= c.shard < len(self.shards) or c.tick <= self.checkpoint["tick"]:
            return False
        if self._too_far_ahead(c.tick):
            return False
        a, b = self.shards[c.shard]
        if c.theta0.shape != (self.config.seeds, b - a) or c.gradient.shape != c.theta0.shape:
            return False
        if self.asynchronous:  # no common boundaries: keep each shard's newest state
            self.shard_checkpoints[c.shard] = c
            return False
        self._partial.setdefault(c.tick, {})[c.shard] = c
        return self._try_complete(c.tick)

    def _try_complete(self, tick: int) -> bool:
        parts = self._partial.get(tick, {})
        if len(parts) < len(self.shards) or tick not in self._stage_at:
            return False
        shards = [self._shard_state(k, m.theta0, m.gradient, m.updates,
                                    {"pending_arrival": m.pending_arrival, "pending_tag": m.pending_tag,
                                     "pending_value": m.pending_value})
                  for k, m in sorted(parts.items())]
        self.checkpoint = dict(self._stage_at.pop(tick), shards=shards)
        self._partial = {t: v for t, v in self._partial.items() if t > tick}
        self._stage_at = {t: v for t, v in self._stage_at.items() if t > tick}
        self.checkpoints_taken += 1
        return True

    def assignments(self) -> list[p.Assign]:
        """Restart every shard from the checkpoint under a new epoch (also the first start)."""
        ck = self.checkpoint
        if self.run_started is None:
            self.run_started = time.perf_counter()
        self.epoch += 1
        self.tick = ck["tick"]
        self.have.clear()
        self.held[:] = -1
        self._partial.clear()
        self._stage_at = {}
        self.chip.restore(ck["chip"], self.tick)
        self.trail = ck["trail"].copy()
        self.checksums = [None] * len(self.shards)  # each node's first digest carries its θ⁰
        self.resync_streak[:] = 0
        out = []
        for k, ((a, b), st) in enumerate(zip(self.shards, ck["shards"])):
            self.static[:, a:b] = st["theta0"]
            out.append(p.Assign(self.id, self.epoch, k, a, b, self.num_params, self.tick, st["updates"],
                                self.config.to_dict(), st["theta0"], st["gradient"], st["pending_arrival"],
                                st["pending_tag"], st["pending_value"]))
        return out

    def reassign(self, k: int) -> p.Assign:
        """Async: shard k alone, from its newest checkpoint, while the others keep running."""
        a, b = self.shards[k]
        c = self.shard_checkpoints.get(k)
        # The newcomer's clock restarts at the checkpoint's tick: accept its weights from
        # there on. Until they arrive, C̃ tags this shard with a tick before its start,
        # which the newcomer knows it did not perturb and ignores.
        self.held[k] = (self.checkpoint["tick"] if c is None else c.tick) - 1
        if c is None:
            st = self.checkpoint["shards"][k]
            c = p.Checkpoint(self.id, self.epoch, k, self.checkpoint["tick"], st["updates"], st["theta0"],
                             st["gradient"], st["pending_arrival"], st["pending_tag"], st["pending_value"])
        return p.Assign(self.id, self.epoch, k, a, b, self.num_params, c.tick, c.updates, self.config.to_dict(),
                        c.theta0, c.gradient, c.pending_arrival, c.pending_tag, c.pending_value)

    # --- the tick cycle -----------------------------------------------------------------------
    def on_weights(self, w: p.Weights) -> str:
        """Store one shard's weights; the reason when one was refused ("shape", "tick"), else "".

        Sync keeps only weights of the current tick; async keeps each shard's newest.
        """
        if w.epoch != self.epoch or not 0 <= w.shard < len(self.shards):
            return ""
        if self.replica:
            return "unexpected"  # this job's nodes send digests
        if (w.tick <= self.held[w.shard]) if self.asynchronous else (w.tick != self.tick):
            return ""  # stale (earlier tick or epoch) or a duplicate resend: nothing to do
        if self._too_far_ahead(w.tick):
            return "tick"  # no node can be there yet
        a, b = self.shards[w.shard]
        shape = (self.config.seeds, b - a)
        if w.effective.shape != shape or (w.static is not None and w.static.shape != shape):
            return "shape"
        self.effective[:, a:b] = w.effective
        if w.static is not None:
            self.static[:, a:b] = w.static
        self.have.add(w.shard)
        self.held[w.shard] = w.tick
        self.held_at[w.shard] = self.tick
        return ""

    # A shard whose digests are refused this many times in a row stops the job (service.py).
    MAX_RESYNCS = 3

    def on_digest(self, d: p.Digest) -> str:
        """Replica uplink: shard ``d.shard`` is at tick ``d.tick`` with θ⁰ of checksum
        ``d.checksum`` (θ⁰ itself in ``d.static`` when it changed). The reason when refused:
        "shape", "unexpected" (a job with the full uplink), or "resync": the checksum disagrees
        with this replica of the shard's θ⁰ (or with the θ⁰ sent along with it), and the node
        must send its θ⁰ again (more than :data:`MAX_RESYNCS` refusals in a row stop the job).
        """
        k = d.shard
        if d.epoch != self.epoch or not 0 <= k < len(self.shards) or d.tick != self.tick:
            return ""  # another epoch, a stale tick or a duplicate resend: nothing to do
        if not self.replica:
            return "unexpected"
        a, b = self.shards[k]
        if d.static is not None:
            if d.static.shape != (self.config.seeds, b - a) or d.static.dtype != self.static.dtype:
                return "shape"
            got = p.checksum(d.static)
            if got != d.checksum:  # what arrived is not what the node summed
                return self._resync(k)
            self.static[:, a:b] = d.static
            self.checksums[k] = got
        elif d.checksum != self.checksums[k]:  # the node's θ⁰ is not our replica of it
            return self._resync(k)
        self.resync_streak[k] = 0
        self.have.add(k)
        self.held[k] = d.tick
        self.held_at[k] = self.tick
        return ""

    def _resync(self, k: int) -> str:
        self.resync_streak[k] += 1
        self.resyncs.append((self.tick, k))
        del self.resyncs[:-1000]
        return "resync"

    def staleness(self, tick: int) -> list[int]:
        """Per node: broadcaster ticks since the shard used at ``tick`` arrived (0 in sync mode)."""
        return (tick - self.held_at).tolist() if self.asynchronous else [0] * len(self.shards)

    @property
    def ready(self) -> bool:
        return len(self.have) == len(self.shards) and not self.finished

    def advance(self) -> tuple[p.CostVariation | None, EvalPoint | None]:
        """All weights of tick t are in: evaluate if due, then run tick t (None once finished)."""
        t, chip = self.tick, self.chip
        point = None
        if chip.evaluation_due(t):
            point = chip.measure(t, self.static)
            chip.record(point, self.static)
            self.finished = chip.over
        if t >= self.config.max_ticks:
            self.finished = True
        if self.finished:
            return None, point
        if t > 0 and t % self.config.checkpoint_every == 0 and not self.asynchronous:
            self._stage_at[t] = self._boundary(t, [])
            self._try_complete(t)
        self.trail.update(self.static)  # C-contiguous: the bytes of tobytes(), without the copy
        if self.replica:  # θ⁰ + θ̃[t], as each node computes it (ParameterNode.effective_weights)
            for (a, b), theta_tilde in zip(self.shards, self._theta_tilde):
                np.add(self.static[:, a:b], theta_tilde.at(t), out=self.effective[:, a:b])
        chip.begin_tick(t)
        c_tilde = chip.cost_variation(self.static, self.effective)
        tags = None
        if self.asynchronous:
            tags = self.held.copy()  # each node correlates C̃ with the tick of the shard used
        else:
            self.have.clear()
        self.tick = t + 1
        return p.CostVariation(self.id, self.epoch, t, t, np.ascontiguousarray(c_tilde, dtype=np.float64), tags), point

    def result(self) -> JobResult:
        return self.chip.result(self.tick, self.static, time.perf_counter() - self.started)

    def close(self) -> None:
        """Close the job's chip client, if it has one (the job is over, or abandoned)."""
        self.chip.close()
        if self._remote is not None:
            self._remote.close()

    # --- persistence (broadcaster restart) ----------------------------------------------------
    SHARD_ARRAYS = ("theta0", "gradient", "pending_arrival", "pending_tag", "pending_value")

    def save(self, path: str) -> None:
        """Write the checkpoint as one state file, ``path``, atomically and with its digest
        (services/state_file.py): a kill at any instant leaves the previous checkpoint or this one."""
        ck, chip = self.checkpoint, self.checkpoint["chip"]
        arrays = {f"{k}/{name}": st[name] for k, st in enumerate(ck["shards"]) for name in self.SHARD_ARRAYS}
        arrays.update(t_sol=chip["t_sol"], c0_sol=chip["c0_sol"], t_div=chip["t_div"])
        meta = {"job": self.id, "config": self.config.to_dict(), "tick": ck["tick"], "stage": chip["stage"],
                "updates": [st["updates"] for st in ck["shards"]], "epoch": self.epoch,
                "history": [[h.tick, h.c0_measurements, h.cost.tolist(), h.accuracy.tolist()]
                            for h in self.history[: chip["history"]]]}
        arrays["meta"] = np.array(json.dumps(meta))
        save_state(path, arrays)

    @classmethod
    def load(cls, path: str, device: str | None = None, evaluator: str = "",
             evaluator_keys: Keys | None = None,
             chip_keys: Keys | Callable[[JobConfig], Keys | None] | None = None) -> JobRun:
        """The job of a checkpoint written by :meth:`save`; ValueError (with the reason) for a
        file that is damaged, foreign or does not fit its own config. ``chip_keys`` may be a
        function of the job's config (the keys depend on where its chip is)."""
        arrays = load_state(path)
        try:
            meta = json.loads(str(arrays["meta"]))
            config = JobConfig.from_dict(meta["config"])
            job = cls(meta["job"], config, device=device, evaluator=evaluator, evaluator_keys=evaluator_keys,
                      chip_keys=chip_keys(config) if callable(chip_keys) else chip_keys)
            S = job.config.seeds
            shards = []
            for k, (a, b) in enumerate(job.shards):
                st = {name: arrays[f"{k}/{name}"] for name in cls.SHARD_ARRAYS} | {"updates": meta["updates"][k]}
                if st["theta0"].shape != (S, b - a) or st["gradient"].shape != (S, b - a):
                    raise ValueError(f"shard {k} holds {st['theta0'].shape}, the job needs {(S, b - a)}")
                shards.append(st)
            chip = {"stage": meta["stage"], "t_sol": arrays["t_sol"], "c0_sol": arrays["c0_sol"],
                    "t_div": arrays["t_div"]}
            job.chip.history[:] = [EvalPoint(t, c0, np.array(c), np.array(a)) for t, c0, c, a in meta["history"]]
            chip["history"] = len(job.chip.history)
            job.chip.restore(chip, meta["tick"])
            job.epoch = meta["epoch"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a checkpoint this broadcaster can resume ({err})") from None
        job.checkpoint = {"tick": meta["tick"], "shards": shards, "chip": job.chip.state(), "trail": hashlib.sha256()}
        job.trail_valid = False
        return job
