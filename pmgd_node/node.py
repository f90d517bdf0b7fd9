"""The parameter node's algorithm core: what sits in silicon beside each synapse.

A node owns a contiguous shard ``[start, stop)`` of the global parameter vector: its static
values θ⁰, its perturbation generator and its integrator. It hears one global scalar per
run and tick, the cost variation C̃[t], and updates itself from that and local state alone:

    ε_i[t] = C̃[t] · θ̃_i[t] / ⟨θ̃_i²⟩                      (error signal)
    G_i    ← integrate(G_i, ε_i)                          (sum, momentum or leaky lowpass)
    θ⁰_i   ← θ⁰_i − η·G_i    every τ_θ ticks (discrete; after tick t with (t+1) mod τ_θ = 0)
                              every tick      (analog: dθ⁰/dt = −ηG, one step per tick)

No sockets, clocks or environment reads: the node process (and the in-process engine)
feeds it ticks and C̃ values. Because θ̃[t] is a pure function of (seed, index, t), a C̃
that arrives tagged with the tick it was measured at is correlated with exactly the
perturbation that produced it, recomputed on demand: no history buffer is needed.
"""

from __future__ import annotations

import numpy as np

from .config import JobConfig
from .integrator import make_integrator
from .perturbation import Perturbation, make_perturbation

# Ticks of θ̃ generated at once: the generators are vectorised over time, so a block costs
# little more than one tick and a node asks for a new one every BLOCK ticks only.
BLOCK = 64


class ParameterNode:
    """θ⁰, θ̃, G of the shard [start, stop) for S independent runs (arrays shaped (S, n))."""

    def __init__(self, config: JobConfig, num_params: int, start: int, stop: int, theta0: np.ndarray):
        if not 0 <= start < stop <= num_params:
            raise ValueError(f"shard [{start}, {stop}) is not inside [0, {num_params})")
        theta0 = np.array(theta0, copy=True)
        seeds = config.seed + np.arange(config.seeds)
        if theta0.shape != (len(seeds), stop - start):
            raise ValueError(f"theta0 has shape {theta0.shape}, expected {(len(seeds), stop - start)}")
        self.config = config
        self.start, self.stop = start, stop
        self.theta0 = theta0
        self.perturbation: Perturbation = make_perturbation(
            config.perturbation, num_params, seeds, config.amplitude, config.fm_band, theta0.dtype
        )
        self.integrator = make_integrator(
            config.resolved_integrator, theta0.shape, config.tau_theta, config.momentum_decay, theta0.dtype
        )
        self._inv_power = theta0.dtype.type(1.0 / self.perturbation.power)
        self._eta = theta0.dtype.type(config.eta)
        self._analog = config.mode == "analog"
        self._block_t0 = -1
        self._block: np.ndarray | None = None
        # Reused buffers: a block of θ̃ is ~S·n·BLOCK values, and ε is rebuilt every tick.
        self._block_buf = np.empty((BLOCK,) + theta0.shape, dtype=theta0.dtype)
        self._eps = np.empty_like(theta0)
        self._tau_theta = config.tau_theta
        self.updates = 0

    @property
    def gradient(self) -> np.ndarray:
        """The integrated gradient estimate G of this shard, (S, n)."""
        return self.integrator.g

    def perturbation_at(self, tick: int) -> np.ndarray:
        """θ̃[tick] of this shard, (S, n), from the cached block of ticks when possible."""
        k = tick - self._block_t0
        if not 0 <= k < BLOCK or self._block is None:
            self._block_t0 = tick - tick % BLOCK
            self._block = self.perturbation.block(self._block_t0, BLOCK, self.start, self.stop, out=self._block_buf)
            k = tick - self._block_t0
        return self._block[k]

    def effective_weights(self, tick: int) -> np.ndarray:
        """θ⁰ + θ̃[tick]: what the network computes with during a perturbed tick."""
        return self.theta0 + self.perturbation_at(tick)

    def update_due(self, tick: int) -> bool:
        return self._analog or (tick + 1) % self._tau_theta == 0

    def receive(self, c_tilde: np.ndarray, tick: int) -> bool:
        """Integrate ε = C̃·θ̃[tick]/⟨θ̃²⟩ and apply the update if one is due; True if θ⁰ changed.

        ``c_tilde`` has one value per run, shape (S,).
        """
        c = np.asarray(c_tilde, dtype=self.theta0.dtype)[:, None]
        eps = np.multiply(c, self.perturbation_at(tick), out=self._eps)
        eps *= self._inv_power
        self.integrator.accumulate(eps)
        if not (self._analog or (tick + 1) % self._tau_theta == 0):
            return False
        # ε's buffer is free again: it takes η·G (the same product as a fresh array would).
        self.theta0 -= np.multiply(self._eta, self.integrator.g, out=eps)
        self.integrator.after_update()
        self.updates += 1
        return True
