"""Angle between a gradient estimate and the true gradient (paper Figs 2a, 3b).

    angle(G, ∇C) = (180/π) · arccos( G · ∇C / (‖G‖ ‖∇C‖) )

computed over the last axis, so any leading axes (runs, time) broadcast. 0° means the
estimate points exactly along the gradient, 90° that it carries no information (the
value returned when either vector is zero), 180° that it points uphill.
"""

from __future__ import annotations

import numpy as np

__all__ = ["angle_degrees"]


def angle_degrees(g, true_grad) -> np.ndarray:
    """Angle in degrees between ``g`` and ``true_grad`` along the last axis (float64)."""
    g = np.asarray(g, dtype=np.float64)
    t = np.asarray(true_grad, dtype=np.float64)
    # Scale each vector by its largest entry first so squares neither overflow nor underflow.
    g = g / _safe(np.max(np.abs(g), axis=-1, keepdims=True))
    t = t / _safe(np.max(np.abs(t), axis=-1, keepdims=True))
    dot = np.sum(g * t, axis=-1)
    norm = np.sqrt(np.sum(g * g, axis=-1)) * np.sqrt(np.sum(t * t, axis=-1))
    cos = np.where(norm > 0, dot / _safe(norm), 0.0)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _safe(d: np.ndarray) -> np.ndarray:
    return np.where(d > 0, d, 1.0)
