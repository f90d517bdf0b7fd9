"""The divergence guard: a run whose cost or weights stop being finite ends at that tick and is
reported as diverged, never as a normal-looking summary of NaN.

A Fashion-MNIST CNN (generated data) at η = 10³ overflows within a few ticks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pmgd_node.config import JobConfig
from services.chip.job import DIVERGENCE_BOUND, EvalPoint, diverged, summarize
from services.engine.engine import Engine
from services.evaluator.data import write_fake_fashion_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fmnist")
    write_fake_fashion_mnist(path, n_train=200, n_test=50, seed=0)
    return str(path)


def _blowing_up(data_dir, **kw) -> JobConfig:
    return JobConfig(task="fmnist", data_dir=data_dir, batch=10, amplitude=0.01, eta=1e3, max_ticks=500,
                     eval_every=50, target_accuracy=None, **kw)


def _first_non_finite(config: JobConfig) -> np.ndarray:
    """Per run: the first tick whose C̃ is not finite, found by stepping a twin engine by hand."""
    twin, first = Engine(config, device="cpu"), np.full(config.seeds, -1)
    while (first < 0).any() and twin.tick < config.max_ticks:
        t = twin.tick
        first[(~np.isfinite(twin.step())) & (first < 0)] = t
    return first


def test_a_run_driven_to_divergence_stops_at_its_first_non_finite_cost(data_dir):
    config = _blowing_up(data_dir)
    first = _first_non_finite(config)
    assert 0 < first[0] < 50  # it blows up before the first evaluation
    result = Engine(config, device="cpu").run()
    assert result.diverged_at.tolist() == first.tolist()
    assert result.ticks == first[0] + 1  # stopped at once: not at the next evaluation, not at the budget
    s = summarize(result)
    assert s["diverged"] == 1 and s["diverged_at"] == first.tolist()
    assert s["final_cost"] == [None] and s["final_cost_median"] is None
    json.dumps(s, allow_nan=False)  # valid JSON: no NaN anywhere


def test_every_run_of_a_sweep_is_reported_with_its_own_tick(data_dir):
    config = _blowing_up(data_dir, seeds=3)
    first = _first_non_finite(config)
    result = Engine(config, device="cpu").run()
    assert result.diverged_at.tolist() == first.tolist()
    assert result.ticks == first.max() + 1  # the job ends when its last run diverges
    assert summarize(result)["diverged"] == 3


def test_a_healthy_run_is_not_flagged():
    result = Engine(JobConfig(seeds=8, max_ticks=2000)).run()
    assert result.solved.any()
    assert (result.diverged_at == -1).all() and summarize(result)["diverged"] == 0


def test_weights_beyond_the_bound_or_not_finite_count_as_diverged():
    theta = np.zeros((5, 3))
    theta[1, 2] = 2 * DIVERGENCE_BOUND
    theta[2, 0] = np.nan
    theta[3, 1] = -np.inf
    cost = np.array([0.1, 0.1, 0.1, 0.1, np.inf])
    point = EvalPoint(10, 5, cost, np.zeros(5))
    assert diverged(point, theta).tolist() == [False, True, True, True, True]
    theta[1, 2] = DIVERGENCE_BOUND  # at the bound is still bounded
    assert not diverged(EvalPoint(10, 5, np.zeros(5), np.zeros(5)), theta)[1]


def test_pmgd_train_reports_divergence_and_exits_3(data_dir, tmp_path):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "services.cli", "train", "--task", "fmnist", "--data-dir", data_dir,
                        "--batch", "10", "--amplitude", "0.01", "--eta", "1000", "--max-ticks", "500",
                        "--eval-every", "50", "--target-accuracy", "none", "--json", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert r.returncode == 3, r.stderr
    assert "runs diverged" in r.stderr and "first at tick" in r.stderr
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["diverged"] == 1


@pytest.mark.slow
def test_the_cluster_stops_a_diverging_job_where_the_engine_does(data_dir):
    """Sync cluster, two node processes: the same tick of divergence and the same history."""
    from services.cluster.client import run_job
    from services.cluster.launcher import LocalCluster

    config = _blowing_up(data_dir, nodes=2, seeds=2)
    reference = summarize(Engine(config, device="cpu").run())
    with LocalCluster(2) as cluster:
        summary = run_job(config, cluster.endpoints["control"], lambda d: None, keys=cluster.keys)
    assert summary["diverged_at"] == reference["diverged_at"] and summary["diverged"] == 2
    assert summary["ticks_run"] == reference["ticks_run"]
