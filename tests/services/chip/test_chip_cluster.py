"""Jobs on a real cluster (broadcaster and node processes, services.cluster.launcher.LocalCluster)
whose forward passes run on the reference chip (examples/reference_chip.py), its own process."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pmgd_node.config import JobConfig
from services.cluster.client import JobFailed, run_job, status
from services.cluster.launcher import LocalCluster
from services.engine.engine import Engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(2, heartbeat_timeout_s=2.0) as c:
        yield c


def _in_process(config: JobConfig):
    engine = Engine(config.replace(chip=""))
    return engine.run(), engine.theta0


def test_parity2_trains_through_a_perfect_chip_on_a_two_node_cluster(cluster, ref_chip):
    chip = ref_chip()
    config = JobConfig(nodes=2, seeds=2, seed=1, max_ticks=3000, chip=chip.endpoint)
    summary = run_job(config, cluster.endpoints["control"], timeout_s=120, keys=cluster.keys)
    result, theta0 = _in_process(config)
    assert summary["converged"] == int(result.solved.sum()) == 2  # the stopping rule, met on the chip
    assert summary["ticks_run"] == result.ticks
    assert summary["final_accuracy"] == [1.0, 1.0]
    # The chip's own numpy code, not the project's: equal to float rounding, not bit for bit.
    np.testing.assert_allclose(np.array(summary["theta0"]), theta0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(summary["final_cost"], result.final_cost, rtol=1e-9, atol=1e-12)


def test_a_chip_with_another_p_fails_the_job_with_the_field_named(cluster, ref_chip):
    chip = ref_chip("--task", "parity3")
    bad = JobConfig(nodes=2, task="parity3", network="3-2-1", chip=chip.endpoint)  # P = 11, the chip's 16
    with pytest.raises(JobFailed, match=r"job config field 'chip': .* has P=16 parameters but the network "
                                        r"of this job \(mlp-3-2-1\) has 11"):
        run_job(bad, cluster.endpoints["control"], timeout_s=60, keys=cluster.keys)
    assert status(cluster.endpoints["control"], keys=cluster.keys)["state"] == "idle"


@pytest.mark.slow
def test_a_chip_killed_mid_job_and_restarted_is_retried_and_the_job_finishes(cluster, ref_chip):
    chip = ref_chip()
    config = JobConfig(nodes=2, seeds=2, seed=1, max_ticks=1500, target_accuracy=None, eval_every=20,
                       chip=chip.endpoint, chip_timeout=1.0, chip_retries=3)
    restarted = []

    def on_progress(d):
        if d["tick"] >= 100 and not restarted:
            chip.kill()  # kill -9, mid-job
            restarted.append(ref_chip(endpoint=chip.endpoint))

    summary = run_job(config, cluster.endpoints["control"], on_progress, timeout_s=120, keys=cluster.keys)
    result, theta0 = _in_process(config)
    assert restarted and summary["ticks_run"] == result.ticks == 1500
    np.testing.assert_allclose(np.array(summary["theta0"]), theta0, rtol=1e-9, atol=1e-12)  # never a wrong result
    assert restarted[0].stop() == 0
    answered = int(re.search(r"stopped after (\d+) answers", restarted[0].tail).group(1))
    assert answered > 100, restarted[0].tail  # the job went on through the new chip (a hello, then the ticks)


@pytest.mark.slow
def test_a_chip_that_stays_dead_fails_the_job_naming_the_chip(cluster, ref_chip):
    chip = ref_chip()
    config = JobConfig(nodes=2, max_ticks=20_000, target_accuracy=None, eval_every=20, chip=chip.endpoint,
                       chip_timeout=0.3, chip_retries=1)

    def on_progress(d):
        if d["tick"] >= 60:
            chip.kill()

    with pytest.raises(JobFailed) as err:
        run_job(config, cluster.endpoints["control"], on_progress, timeout_s=120, keys=cluster.keys)
    assert str(err.value).startswith(f"chip {chip.endpoint}: ") and "no answer within 0.3 s" in str(err.value)
    assert status(cluster.endpoints["control"], keys=cluster.keys)["state"] == "idle"  # ready for the next job


@pytest.mark.slow
def test_pmgd_train_engine_cluster_with_chip(ref_chip, tmp_path):
    chip = ref_chip()
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "train", "--engine", "cluster", "--nodes", "2",
                           "--task", "parity2", "--chip", chip.endpoint, "--quiet", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(out.read_text())
    assert summary["engine"] == "cluster" and summary["converged"] == 1 and summary["config"]["chip"] == chip.endpoint
