"""The chip's output stage: present inputs, run the network, extract C̃ (no I/O).

Per perturbed tick t the stage

1. changes the input every τ_x ticks (``batch`` samples at once, epochs shuffled by the job seed);
2. in discrete mode, asks for a C₀ measurement whenever the input changed or the θ⁰ it
   holds changed since the last one, and holds it: C̃ = C(θ⁰ + θ̃) − C₀. In sync timing
   θ⁰ changes on a schedule (updates follow ticks with (t+1) mod τ_θ = 0). In async timing
   it changes whenever a newer shard with another θ⁰ reaches the broadcaster, at no tick
   the stage can predict, so it compares the θ⁰ it is handed with the one C₀ was measured
   on: either way C₀ is the cost of the held θ⁰ on the current input;
3. in analog mode, high-pass filters C(t) instead (no C₀ measurements at all);
4. clips C̃ to ±``c_tilde_limit`` when the job sets one (after noting a non-finite C̃).

The broadcaster service and the in-process engine both drive this class; they differ only
in how the weights reach it and how C̃ leaves it.
"""

from __future__ import annotations

import numpy as np

from pmgd_node import imperfections
from pmgd_node.config import JobConfig
from pmgd_node.cost_variation import HighPass, SampleAndHold
from pmgd_node.perturbation import seeded_uniform

_ORDER_STREAM = 0x44415441  # "DATA"


class InputSchedule:
    """Sample indices shown at input step k = ⌊t/τ_x⌋: consecutive ``batch``-sized slices of
    an endless stream of epochs, each epoch a permutation drawn from (seed, epoch).

    The stream is served from a window of whole epochs drawn together: one vectorised hash
    over (epoch, sample) and a row-wise stable argsort give, row by row, exactly
    ``seeded_permutation(seed·1000003 + epoch, …)``, so small data sets (parity: 4 samples,
    a new epoch every 4 ticks) cost one slice per step instead of a permutation per epoch.
    """

    _WINDOW = 4096  # positions per window, at least two epochs

    def __init__(self, num_samples: int, batch: int, seed: int):
        self.n, self.batch, self.seed = num_samples, batch, seed
        self._epochs_per_window = max(2 + batch // num_samples, self._WINDOW // num_samples)
        self._lo = 0  # stream position of self._window[0]
        self._window = np.empty(0, dtype=np.int64)

    def _orders(self, first_epoch: int, count: int) -> np.ndarray:
        seeds = np.array([self.seed * 1_000_003 + e for e in range(first_epoch, first_epoch + count)])
        u = seeded_uniform(seeds, _ORDER_STREAM, np.arange(self.n))
        return np.argsort(u, axis=1, kind="stable")  # (count, n)

    def indices(self, step: int) -> np.ndarray:
        """The ``batch`` sample indices of step k (a read-only view)."""
        k = step * self.batch - self._lo
        if k < 0 or k + self.batch > len(self._window):
            first = step * self.batch // self.n
            self._window = self._orders(first, self._epochs_per_window).reshape(-1)
            self._window.flags.writeable = False
            self._lo = first * self.n
            k = step * self.batch - self._lo
        return self._window[k:k + self.batch]


class OutputStage:
    """Forward pass and C̃ extraction for the S runs of one job."""

    def __init__(self, config: JobConfig, model, train, remote=None):
        """``remote``: a chip (:class:`services.chip.client.ChipClient`: docs/chip-protocol.md)
        that runs the forward passes, ``remote.cost(θ, indices)``; the batch is then just the
        sample indices. None runs them here."""
        self.remote = remote
        self.config = config
        self.model = model
        self.train = train
        self.schedule = InputSchedule(len(train.y), config.batch, config.seed)
        self.discrete = config.mode == "discrete"
        self.asynchronous = config.timing == "async"
        self._c0_theta0: np.ndarray | None = None  # async: the θ⁰ the held C₀ was measured on
        self._tau_x, self._tau_theta = config.tau_x, config.tau_theta
        self.extractor = SampleAndHold() if self.discrete else HighPass(config.tau_hp)
        self.batch = None
        self._c0_stale = True
        self._prepared: dict[bytes, object] = {}
        self.c0_measurements = 0
        # Per run: the first tick whose C̃ was not finite (C or C₀ overflowed: the run
        # diverged), −1 before; ``diverged`` counts such runs.
        self.diverged_at = np.full(config.seeds, -1, dtype=np.int64)
        self.diverged = 0
        self.last_cost = None  # C of the last perturbed tick, per run (reports)
        self._seeds = config.seed + np.arange(config.seeds)
        self._tick = 0
        self._noise_t0, self._noise = -1, None
        self._limit = config.c_tilde_limit

    def begin_tick(self, tick: int) -> None:
        """Present the input of this tick; mark C₀ stale if the input or θ⁰ changed."""
        self._tick = tick
        if tick % self._tau_x == 0 or self.batch is None:
            idx = self.schedule.indices(tick // self._tau_x)
            self.batch = self._prepare(idx)
            self._c0_stale = True
        if tick > 0 and not self.asynchronous and (not self.discrete or tick % self._tau_theta == 0):
            self._c0_stale = True

    def _prepare(self, idx: np.ndarray):
        if self.remote is not None:
            return np.array(idx)
        # Small data sets (parity) cycle through few distinct batches: prepare each once.
        if len(self.train.y) > 64:
            return self.model.prepare(self.train.x[idx], self.train.y[idx])
        key = idx.tobytes()
        batch = self._prepared.get(key)
        if batch is None:
            batch = self._prepared[key] = self.model.prepare(self.train.x[idx], self.train.y[idx])
        return batch

    def _forward(self, theta: np.ndarray) -> np.ndarray:
        return self.remote.cost(theta, self.batch) if self.remote is not None else self.model.cost(theta, self.batch)

    def _noisy(self, cost: np.ndarray, kind: int) -> np.ndarray:
        """The measured cost: ``cost`` plus read-out noise; ``kind`` 0 = C₀, 1 = C."""
        if self.config.cost_noise:
            t0 = self._tick - self._tick % 64  # drawn 64 ticks at a time
            if self._noise_t0 != t0:
                self._noise = imperfections.cost_noise(self._seeds, t0, 64, self.config.cost_noise)
                self._noise_t0 = t0
            cost = cost + self._noise[:, self._tick - t0, kind]
        return cost

    def snapshot(self) -> dict:
        """The stage's state at a tick boundary as plain data (checkpoints, broadcaster restarts)."""
        ex = self.extractor
        held = ex.c0 if self.discrete else ex._y
        last = None if self.discrete else ex._x
        return {"held": None if held is None else held.tolist(), "last": None if last is None else last.tolist(),
                "c0_stale": self._c0_stale, "c0_measurements": self.c0_measurements,
                "diverged_at": self.diverged_at.tolist()}

    def restore(self, snap: dict, tick: int) -> None:
        """Return to the boundary before tick ``tick`` recorded by :meth:`snapshot`."""
        ex = self.extractor

        def arr(v):
            return None if v is None else np.array(v, dtype=np.float64)

        if self.discrete:
            ex.c0 = arr(snap["held"])
        else:
            ex._y, ex._x = arr(snap["held"]), arr(snap["last"])
        self._c0_stale = snap["c0_stale"]
        self._c0_theta0 = None  # async: unknown after a restart, so C₀ is measured afresh
        self.c0_measurements = snap["c0_measurements"]
        self.diverged_at[:] = snap.get("diverged_at", -1)  # absent from checkpoints of older versions
        self.diverged = int((self.diverged_at >= 0).sum())
        # The input on show is the one presented at the last input change before ``tick``.
        self.batch = self._prepare(self.schedule.indices((tick - 1) // self._tau_x)) if tick > 0 else None

    @property
    def needs_theta0(self) -> bool:
        """Whether :meth:`cost_variation` needs the held θ⁰ this tick: to measure a stale C₀,
        or (async) to find out whether it changed."""
        return self.discrete and (self._c0_stale or self.asynchronous)

    def cost_variation(self, theta0: np.ndarray | None, theta: np.ndarray) -> np.ndarray:
        """C̃ of this tick for the effective weights θ = θ⁰ + θ̃, one value per run.

        ``theta0`` is the θ⁰ the broadcaster holds (required when :attr:`needs_theta0`).
        When C₀ is stale it is measured first: C₀ = C(θ⁰) on the current input (one
        unperturbed tick), held. Both passes then go through the network as one batch of
        2S runs, the same numbers at half the calls.
        """
        if self.discrete and self.asynchronous and not self._c0_stale:
            self._c0_stale = not np.array_equal(theta0, self._c0_theta0)
        if self.discrete and self._c0_stale:
            if self.asynchronous:
                self._c0_theta0 = np.array(theta0, copy=True)
            both = self._forward(np.concatenate([theta0, theta]))
            s = len(theta)
            self.extractor.hold(self._noisy(both[:s], 0))
            self.c0_measurements += 1
            self._c0_stale = False
            cost = both[s:]
        else:
            cost = self._forward(theta)
        self.last_cost = self._noisy(cost, 1)
        with np.errstate(invalid="ignore"):  # ∞ − ∞ of a diverged run: flagged just below
            c_tilde = self.extractor.variation(self.last_cost)
        if not np.isfinite(c_tilde).all():
            new = ~np.isfinite(c_tilde) & (self.diverged_at < 0)
            self.diverged_at[new] = self._tick
            self.diverged = int((self.diverged_at >= 0).sum())
        if self._limit is not None:
            c_tilde = np.clip(c_tilde, -self._limit, self._limit)
        return c_tilde
