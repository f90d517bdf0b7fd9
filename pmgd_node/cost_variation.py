"""Chip-side extraction of the cost variation C̃ (paper §3).

* :class:`SampleAndHold` (discrete): hold C₀, the unperturbed cost of the current input
  and current θ⁰, then C̃[t] = C[t] − C₀.
* :class:`HighPass` (analog): a first-order RC high-pass with time constant τ_hp (ticks),
  discretised at one sample per tick:  y[t] = α·(y[t−1] + C[t] − C[t−1]),  α = τ_hp/(τ_hp + 1).
  It removes the slowly varying part of C(t) and keeps the perturbative part.

Both work elementwise on a vector of costs, one per independent run.
"""

from __future__ import annotations

import numpy as np


class SampleAndHold:
    def __init__(self) -> None:
        self.c0: np.ndarray | None = None

    def hold(self, c0: np.ndarray) -> None:
        self.c0 = np.array(c0, dtype=np.float64)

    def variation(self, cost: np.ndarray) -> np.ndarray:
        if self.c0 is None:
            raise RuntimeError("C₀ has not been measured yet: hold() before variation()")
        return cost - self.c0


class HighPass:
    def __init__(self, tau_hp: float) -> None:
        self.alpha = tau_hp / (tau_hp + 1.0)
        self._y: np.ndarray | None = None
        self._x: np.ndarray | None = None

    def variation(self, cost: np.ndarray) -> np.ndarray:
        cost = np.asarray(cost, dtype=np.float64)
        if self._x is None:  # the filter starts at rest on the first sample
            self._y = np.zeros_like(cost)
        else:
            self._y = self.alpha * (self._y + cost - self._x)
        self._x = cost
        return self._y
