"""Local gradient integrators G_i (paper §3, eqs. 1–2).

Each integrator owns the state G of one shard (shape (S, n), S independent runs) and
says what happens to it at every tick and after every update θ⁰ ← θ⁰ − ηG:

* :class:`SumIntegrator` (discrete, eq. 1): G[t] = G[t−1] + ε[t]; reset to 0 after each update.
* :class:`MomentumIntegrator` (discrete, not reset): G[t] = β·G[t−1] + ε[t], never reset.
  β = 1 is the paper's literal un-reset sum; β < 1 is the usual heavy-ball momentum.
* :class:`LowPassIntegrator` (analog, eq. 2): dG/dt = ε − G/τ_θ, stepped once per tick
  with the exact zero-order-hold solution G ← e^{−1/τ_θ}·G + τ_θ(1 − e^{−1/τ_θ})·ε,
  so a constant ε settles at G = τ_θ·ε, as the continuous filter does.
"""

from __future__ import annotations

import math

import numpy as np


class Integrator:
    """State G and its per-tick and per-update rules."""

    def __init__(self, shape: tuple[int, ...], dtype=np.float64):
        self.g = np.zeros(shape, dtype=dtype)

    def accumulate(self, eps: np.ndarray) -> None:
        self.g += eps

    def after_update(self) -> None:
        """Called after θ⁰ ← θ⁰ − ηG."""


class SumIntegrator(Integrator):
    def after_update(self) -> None:
        self.g.fill(0)


class MomentumIntegrator(Integrator):
    def __init__(self, shape, beta: float = 1.0, dtype=np.float64):
        super().__init__(shape, dtype)
        self.beta = beta

    def accumulate(self, eps: np.ndarray) -> None:
        if self.beta != 1.0:
            self.g *= self.beta
        self.g += eps


class LowPassIntegrator(Integrator):
    def __init__(self, shape, tau: float, dtype=np.float64):
        super().__init__(shape, dtype)
        self.decay = math.exp(-1.0 / tau)
        self.gain = tau * (1.0 - self.decay)

    def accumulate(self, eps: np.ndarray) -> None:
        self.g *= self.decay
        self.g += self.gain * eps


def make_integrator(kind: str, shape, tau_theta: float, momentum_decay: float = 1.0, dtype=np.float64) -> Integrator:
    if kind == "sum":
        return SumIntegrator(shape, dtype)
    if kind == "momentum":
        return MomentumIntegrator(shape, momentum_decay, dtype)
    if kind == "lowpass":
        return LowPassIntegrator(shape, tau_theta, dtype)
    raise ValueError(f"integrator must be one of sum, momentum, lowpass; got {kind!r}")
