"""Hardware imperfections (as in the authors' follow-up work on PMGD in imperfect hardware).

Three seeded models, each a pure function of (run seed, stream, index) like the
perturbations, so the in-process engine and the cluster draw the same numbers whatever the
sharding:

* **cost noise** σ_c: every measured cost is C + σ_c·ξ, ξ ~ N(0, 1) fresh per run,
  measurement and tick (the output stage's read-out noise; C₀ and C each get their own ξ);
* **weight-update noise** σ_u: every update is θ⁰_i ← θ⁰_i − η·u_i·G_i + σ_u·ξ_i (a write
  that lands imprecisely);
* **device-to-device variation** σ_d: parameter i of run r has a fixed perturbation gain a_i
  and update gain u_i, each 1 + σ_d·ξ (clipped at 0). The node still normalises by the
  nominal ⟨θ̃²⟩, so its gradient estimate of parameter i is scaled by a_i²·u_i.
"""

from __future__ import annotations

import numpy as np

from .perturbation import seeded_uniform

COST_STREAM = 0x434F5354  # "COST"
UPDATE_STREAM = 0x55504454  # "UPDT"
AMP_GAIN_STREAM = 0x414D5047  # "AMPG"
UPDATE_GAIN_STREAM = 0x55504447  # "UPDG"


def seeded_normal(seeds: np.ndarray, stream: int, index: np.ndarray) -> np.ndarray:
    """Standard normal numbers as a pure function of (seed, stream, index): shape (S, n).

    Box–Muller on two independent seeded uniforms (streams ``stream`` and ``stream + 1``)."""
    u1 = seeded_uniform(seeds, stream, index)
    u2 = seeded_uniform(seeds, stream + 1, index)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def cost_noise(seeds: np.ndarray, t0: int, count: int, sigma: float) -> np.ndarray:
    """σ_c·ξ for the cost measurements of ticks [t0, t0 + count): shape (S, count, 2), the last
    axis being the measurement kind (0 = C₀, 1 = C). Any block gives the same value per tick."""
    index = np.arange(2 * t0, 2 * (t0 + count), dtype=np.uint64)
    return sigma * seeded_normal(seeds, COST_STREAM, index).reshape(len(seeds), count, 2)


def update_noise(seeds: np.ndarray, tick: int, start: int, stop: int, num_params: int, sigma: float) -> np.ndarray:
    """σ_u·ξ_i for the update after ``tick`` of parameters [start, stop). Shape (S, stop − start)."""
    index = np.uint64(tick) * np.uint64(num_params) + np.arange(start, stop, dtype=np.uint64)
    return sigma * seeded_normal(seeds, UPDATE_STREAM, index)


def device_gains(seeds: np.ndarray, start: int, stop: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(a, u): perturbation and update gains of parameters [start, stop), each (S, n), ≥ 0."""
    index = np.arange(start, stop, dtype=np.uint64)
    a = np.maximum(1.0 + sigma * seeded_normal(seeds, AMP_GAIN_STREAM, index), 0.0)
    u = np.maximum(1.0 + sigma * seeded_normal(seeds, UPDATE_GAIN_STREAM, index), 0.0)
    return a, u
