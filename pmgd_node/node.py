"""The parameter node's algorithm core: what sits in silicon beside each synapse.

A node owns a contiguous shard ``[start, stop)`` of the global parameter vector: its static
values θ⁰, its perturbation generator and its integrator. It hears one global scalar per
run and tick, the cost variation C̃[t], and updates itself from that and local state alone:

    ε_i[t] = C̃[t] · θ̃_i[t] / ⟨θ̃_i²⟩                      (error signal)
             (analog FM with ``fm_gain_correction``: also / max(Re H(f_i), GAIN_FLOOR),
              its own tone's high-pass gain, pmgd_node.cost_variation)
    G_i    ← integrate(G_i, ε_i)                          (sum, momentum or leaky lowpass)
    θ⁰_i   ← (1 − ηλ)·θ⁰_i − η·G_i
                    every τ_θ ticks (discrete; after tick t with (t+1) mod τ_θ = 0)
                    every tick      (analog: dθ⁰/dt = −η(G + λθ⁰), one step per tick)
             with λ the job's ``weight_decay`` (0 by default: θ⁰_i ← θ⁰_i − η·G_i) and η,
             when the job sets ``eta_decay_ticks`` T, η_t = η/(1 + (t+1)/T)^p at the update
             closing tick t: a schedule every node computes from its own tick count

No sockets, clocks or environment reads: the node process (and the in-process engine)
feeds it ticks and C̃ values. Because θ̃[t] is a pure function of (seed, index, t), a C̃
that arrives tagged with the tick it was measured at is correlated with exactly the
perturbation that produced it, recomputed on demand: no history buffer is needed.
"""

from __future__ import annotations

import numpy as np

from . import imperfections
from .config import JobConfig
from .cost_variation import corrected_gain
from .integrator import make_integrator
from .perturbation import Perturbation, make_perturbation

# Ticks of θ̃ generated at once: the generators are vectorised over time, so a block costs
# little more than one tick and a node asks for a new one every block only. A block holds at
# most BLOCK_VALUES values (2 MiB of float64): by then the per-call cost is long paid for, and
# 64 ticks of a 10⁶-parameter shard would take 256 MB of float32, twice (two blocks are kept).
BLOCK = 64
BLOCK_VALUES = 1 << 18


def block_ticks(runs: int, n: int) -> int:
    """Ticks per block of θ̃ for a shard of ``n`` parameters and ``runs`` runs. A function of
    the shard's shape alone, so every holder of the same shard computes the same blocks."""
    return max(1, min(BLOCK, BLOCK_VALUES // max(1, runs * n)))


class ShardPerturbation:
    """θ̃[t] of the shard [start, stop), shape (S, n): the shard's perturbation, times its
    devices' fixed amplitude gains when the job has device variation, served from a cache of
    two blocks of ``block_ticks(S, n)`` ticks.

    Two blocks are kept so that a late (tagged) C̃ from the previous block does not evict the
    current one. The node's θ̃ is this object; so is the broadcaster's regeneration of it
    for the replica uplink (services/broadcaster/job.py), which is what makes the two equal.
    """

    def __init__(self, perturbation: Perturbation, start: int, stop: int, shape: tuple[int, int], dtype,
                 amp_gain: np.ndarray | None = None, keep: int = 2):
        self.perturbation, self.start, self.stop = perturbation, start, stop
        self.ticks = block_ticks(shape[0], stop - start)
        self._amp_gain = amp_gain
        self._keep = keep  # blocks cached (a holder that only moves forward needs one)
        self._blocks: dict[int, np.ndarray] = {}
        # Reused buffers: fresh blocks would come from the OS page by page.
        self._block_buf = np.empty((self.ticks,) + tuple(shape), dtype=dtype)

    def at(self, tick: int) -> np.ndarray:
        """θ̃[tick], (S, n): a view into the cached block of that tick (do not write to it)."""
        t0 = tick - tick % self.ticks
        block = self._blocks.get(t0)
        if block is None:
            if len(self._blocks) == self._keep:
                buf = self._blocks.pop(min(self._blocks))
            else:
                buf = self._block_buf if not self._blocks else np.empty_like(self._block_buf)
            block = self._blocks[t0] = self.perturbation.block(t0, self.ticks, self.start, self.stop, out=buf)
            if self._amp_gain is not None:
                block *= self._amp_gain
        return block[tick - t0]


def shard_perturbation(config: JobConfig, num_params: int, start: int, stop: int, dtype,
                       perturbation: Perturbation | None = None, keep: int = 2) -> ShardPerturbation:
    """θ̃ of the shard [start, stop) of ``config``'s job exactly as its node applies it (with
    the device gains of ``device_variation``), in ``dtype``. ``perturbation``: the job's
    generator over all P parameters, when the caller holds one already (the broadcaster's
    replica shares one across its shards; values depend only on seed, index and tick)."""
    seeds = config.seed + np.arange(config.seeds)
    if perturbation is None:
        perturbation = make_perturbation(config.perturbation, num_params, seeds, config.amplitude, config.fm_band,
                                         dtype)
    gain = None
    if config.device_variation:
        gain = imperfections.device_gains(seeds, start, stop, config.device_variation)[0].astype(dtype)
    return ShardPerturbation(perturbation, start, stop, (len(seeds), stop - start), dtype, gain, keep)


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
        if config.fm_gain_correction:
            # Each tone's own gain: a function of (seed, index) alone, so sharding changes nothing.
            gain = corrected_gain(self.perturbation.freq[:, start:stop], config.tau_hp)
            self._inv_power = (1.0 / (self.perturbation.power * gain)).astype(theta0.dtype)
        self._eta = theta0.dtype.type(config.eta)
        self._decay = theta0.dtype.type(1.0 - config.eta * config.weight_decay) if config.weight_decay else None
        self._eta_ticks, self._eta_power, self._weight_decay = config.eta_decay_ticks, config.eta_decay_power, \
            config.weight_decay
        self._analog = config.mode == "analog"
        self._tagged = config.correlation == "tagged"
        self._eps = np.empty_like(theta0)  # reused: ε is rebuilt every tick
        self._tau_theta = config.tau_theta
        self._compensation = config.compensation
        self._seeds, self._num_params = seeds, num_params
        self._update_noise = config.update_noise
        # Device-to-device variation: fixed gains of this shard's perturbations (in θ̃) and updates.
        self._update_gain = None
        if config.device_variation:
            u = imperfections.device_gains(seeds, start, stop, config.device_variation)[1]
            self._update_gain = u.astype(theta0.dtype)
        self.theta_tilde = shard_perturbation(config, num_params, start, stop, theta0.dtype, self.perturbation)
        self.updates = 0

    @property
    def gradient(self) -> np.ndarray:
        """The integrated gradient estimate G of this shard, (S, n)."""
        return self.integrator.g

    def perturbation_at(self, tick: int) -> np.ndarray:
        """θ̃[tick] of this shard, (S, n), from a cached block of ticks when possible."""
        return self.theta_tilde.at(tick)

    def effective_weights(self, tick: int) -> np.ndarray:
        """θ⁰ + θ̃[tick]: what the network computes with during a perturbed tick."""
        return self.theta0 + self.perturbation_at(tick)

    def hear(self, c_tilde: np.ndarray, tag: int, now: int) -> None:
        """Integrate ε = C̃·θ̃[k]/⟨θ̃²⟩ for a C̃ measured at tick ``tag`` and heard at tick ``now``.

        Tagged correlation uses k = tag, the perturbation that produced this C̃; untagged
        uses k = now, whatever the node applies when the value arrives (a plain analog
        multiplier), or k = now − ``compensation`` when the node knows the delay (for FM this
        is phase compensation: the product keeps cos 2πf·(d − compensation) of the gradient).
        Without delay all are the same. ``c_tilde`` has one value per run, (S,).
        """
        k = tag if self._tagged else now - self._compensation
        if k < 0:
            return  # nothing was perturbed that long ago
        c = np.asarray(c_tilde, dtype=self.theta0.dtype)[:, None]
        eps = np.multiply(c, self.perturbation_at(k), out=self._eps)
        eps *= self._inv_power
        self.integrator.accumulate(eps)

    def end_tick(self, tick: int) -> bool:
        """Close tick ``tick``: apply θ⁰ ← (1 − ηλ)θ⁰ − ηG if an update is due; True if θ⁰ changed."""
        if not (self._analog or (tick + 1) % self._tau_theta == 0):
            return False
        eta, decay = self._eta, self._decay
        if self._eta_ticks:
            eta_t = self.config.eta / (1.0 + (tick + 1) / self._eta_ticks) ** self._eta_power
            eta = self.theta0.dtype.type(eta_t)
            decay = self.theta0.dtype.type(1.0 - eta_t * self._weight_decay) if self._weight_decay else None
        # ε's buffer is free between ticks: it takes η·G (the same product as a fresh array would).
        step = np.multiply(eta, self.integrator.g, out=self._eps)
        if self._update_gain is not None:
            step *= self._update_gain
        if decay is not None:
            self.theta0 *= decay
        self.theta0 -= step
        if self._update_noise:
            self.theta0 += imperfections.update_noise(self._seeds, tick, self.start, self.stop, self._num_params,
                                                      self._update_noise).astype(self.theta0.dtype)
        self.integrator.after_update()
        self.updates += 1
        return True

    def receive(self, c_tilde: np.ndarray, tick: int) -> bool:
        """Hear C̃[tick] at tick ``tick`` (no link delay) and close the tick; True if θ⁰ changed."""
        self.hear(c_tilde, tick, tick)
        return self.end_tick(tick)

    def state(self) -> dict[str, np.ndarray]:
        """θ⁰ and G of this shard: everything a checkpoint must hold to resume the node."""
        return {"theta0": self.theta0.copy(), "gradient": self.integrator.g.copy()}

    def restore(self, theta0: np.ndarray, gradient: np.ndarray, updates: int) -> None:
        self.theta0[...] = theta0
        self.integrator.g[...] = gradient
        self.updates = updates
