"""Chip-side extraction of the cost variation C̃ (paper §3).

* :class:`SampleAndHold` (discrete): hold C₀, the unperturbed cost of the current input
  and current θ⁰, then C̃[t] = C[t] − C₀.
* :class:`HighPass` (analog): a first-order RC high-pass with time constant τ_hp (ticks),
  discretised at one sample per tick:  y[t] = α·(y[t−1] + C[t] − C[t−1]),  α = τ_hp/(τ_hp + 1).
  It removes the slowly varying part of C(t) and keeps the perturbative part; a tone at f
  cycles per tick comes out scaled by H(f) (:func:`highpass_gain` gives its in-phase part).

Both work elementwise on a vector of costs, one per independent run.
"""

from __future__ import annotations

import numpy as np


def highpass_gain(freq, tau_hp: float) -> np.ndarray:
    """In-phase gain Re H(f) of :class:`HighPass` at ``freq`` cycles per tick (steady state).

    With z = e^{−iω}, ω = 2πf, the filter's transfer function is
    H = α(1 − z)/(1 − αz), α = τ_hp/(τ_hp + 1), and

        Re H(f) = α(1 + α)(1 − cos ω) / (1 − 2α cos ω + α²)

    (multiply by the conjugate of the denominator: Re[(1 − z)(1 − αz̄)] = (1 + α)(1 − cos ω)).
    It rises from 0 at f = 0 (≈ α(1+α)ω²/(2(1−α)²) for small ω: 5ω² at τ_hp = 2) to
    2α/(1 + α) at Nyquist (0.8 at τ_hp = 2). An FM tone θ̃_i = A sin(ωt + φ) correlated with
    the filtered cost keeps Re H(f_i) of its gradient: E[ε_i] = Re H(f_i)·∂C/∂θ_i.
    """
    alpha = tau_hp / (tau_hp + 1.0)
    c = np.cos(2 * np.pi * np.asarray(freq, dtype=np.float64))
    return alpha * (1 + alpha) * (1 - c) / (1 - 2 * alpha * c + alpha * alpha)


# Smallest gain an FM node divides by (``JobConfig.fm_gain_correction``): tones this close to
# f = 0 (Re H ≈ 5ω² at τ_hp = 2: f ≲ 0.007 cycles per tick) are clipped to it, so no node
# amplifies its ε, noise included, more than 100-fold. At τ_hp = 2 and the default band no
# tone of P ≤ 16 is clipped (lowest 1/64, gain 0.046); a 14,378-parameter CNN has 1.4 % below.
GAIN_FLOOR = 0.01


def corrected_gain(freq, tau_hp: float) -> np.ndarray:
    """The gain an FM node divides its ε by: max(Re H(f), GAIN_FLOOR)."""
    return np.maximum(highpass_gain(freq, tau_hp), GAIN_FLOOR)


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
