"""The benchmarks' measuring devices: a baseline that is not what it claims measures nothing."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

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


@pytest.mark.parametrize("task", ["fmnist", "cifar10"])
def test_gpu_cnn_script_runs_the_shipped_config_with_a_line_per_evaluation(task, tmp_path):
    """The prepared GPU run, on the CPU at a tiny budget and generated data: it trains the
    shipped config (η, A, batch 1000), prints a line per evaluation and ends on the summary."""
    from services.evaluator.data import write_fake_cifar10, write_fake_fashion_mnist

    if task == "fmnist":
        write_fake_fashion_mnist(tmp_path, n_train=300, n_test=50)
    else:
        write_fake_cifar10(tmp_path, n_per_batch=60)
    script = os.path.join(ROOT, "benchmarks", "gpu_cnn.py")
    r = subprocess.run([sys.executable, script, task, "--data-dir", str(tmp_path), "--max-ticks", "4",
                        "--eval-every", "2", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("device cpu") and [line.split()[1] for line in lines[1:3]] == ["2", "4"]
    summary = json.loads(lines[-1])
    shipped = JobConfig.load(os.path.join(ROOT, "configs", f"{task}-rcm.toml"))
    assert summary["ticks_run"] == 4 and summary["reached_target"] is False and summary["device"] == "cpu"
    assert (summary["task"], summary["diverged"]) == (task, 0)
    assert summary["config"]["eta"] == shipped.eta and summary["config"]["amplitude"] == shipped.amplitude
    assert summary["config"]["batch"] == 1000
