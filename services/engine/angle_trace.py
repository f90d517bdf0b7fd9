"""Gradient-angle diagnostic (paper Fig 2): how fast G lines up with the true gradient.

θ⁰ is frozen (η = 0, no update within the trace) and the input is fixed, so the integrated
G[t] = Σ_{s≤t} ε[s] should turn towards ∇C(θ⁰) as the perturbations' cross terms cancel:
within one code period for TM and CM, statistically (∝ 1/√t) for R-CM and FM.
"""

from __future__ import annotations

import numpy as np

from pmgd_node.config import JobConfig
from services.evaluator.gradient_angle import angle_degrees

from .engine import Engine


def angle_trace(config: JobConfig, ticks: int, **engine_kwargs) -> np.ndarray:
    """Angle in degrees between G and ∇C after each of ``ticks`` perturbed ticks: (ticks, S).

    The input is the first ``config.batch`` samples of the task's epoch order (use
    ``batch`` = data-set size for the full-data gradient).
    """
    frozen = config.replace(eta=0.0, tau_theta=ticks + 1, tau_x=ticks + 1, max_ticks=ticks,
                            target_accuracy=None, target_cost=None)
    engine = Engine(frozen, **engine_kwargs)
    angles = np.empty((ticks, frozen.seeds))
    true_grad = None
    for t in range(ticks):
        engine.step()
        if true_grad is None:  # the input and θ⁰ are fixed from the first tick on
            true_grad = engine.model.gradient(engine.theta0, engine.stage.batch)
        angles[t] = angle_degrees(engine.transport.gather_gradient(), true_grad)
    return angles
