"""The benchmarks' measuring devices: a baseline that is not what it claims measures nothing."""

import importlib.util
import os

import numpy as np

from pmgd_node.config import JobConfig
from services.engine.engine import Engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_numpy_floor_is_the_engines_arithmetic():
    """engine_overhead's flat loop ends on the engine's θ⁰ and ticks to solution bit for bit,
    including runs that solve early (the stopping rule) and runs that do not."""
    config = JobConfig(seeds=12, max_ticks=1500)
    engine = Engine(config)
    result = engine.run()
    # Both kinds of run are exercised: 7 of 12 solve (Haswell, Prescott and ±1-ulp noise alike).
    assert 0 < result.solved.sum() < 12
    _, theta0, t_sol = _load("engine_overhead").flat_parity(config)
    assert np.array_equal(theta0, engine.theta0)
    assert np.array_equal(t_sol, result.ticks_to_solution)
