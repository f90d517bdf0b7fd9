"""Your own network on the real cluster: bit-identical to the in-process engine."""

import json
import os
import subprocess
import sys

import numpy as np

from pmgd_node.config import JobConfig
from services.cluster.client import run_job
from services.cluster.launcher import LocalCluster
from services.engine.engine import Engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# Timing, and what says which engine ran it: everything else must agree.
_RUN_ONLY = {"wall_time_s", "training_time_s", "engine", "device", "config", "cluster"}


def test_the_issues_xor_command_is_bit_identical_on_both_engines(tmp_path):
    """``pmgd train --model xor_task.py:task --perturbation rcm --seeds 20 --json out.json``, on
    the local engine and with ``--engine cluster --nodes 2``, run from the task's folder."""
    task = tmp_path / "xor_task.py"
    task.write_text(open(os.path.join(ROOT, "examples", "xor_task.py")).read())
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = {}
    for engine in ("local", "cluster"):
        flags = ["--engine", "cluster", "--nodes", "2"] if engine == "cluster" else []
        run = subprocess.run([sys.executable, "-m", "services.cli", "train", "--model", "xor_task.py:task",
                              "--perturbation", "rcm", "--seeds", "20", "--json", f"{engine}.json", "--quiet", *flags],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        out[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
    local = {k: v for k, v in out["local"].items() if k not in _RUN_ONLY}
    assert local == {k: out["cluster"].get(k) for k in local}  # the cluster's summary adds its own fields
    assert local["converged"] >= 15 and local["task"] == "custom" and local["num_params"] == 13


def test_final_theta0_bit_for_bit():
    config = JobConfig(model=os.path.join(ROOT, "examples", "xor_task.py") + ":task", seeds=6, nodes=2,
                       max_ticks=3000, target_accuracy=None, eval_every=500)
    engine = Engine(config)
    engine.run()
    with LocalCluster(2, heartbeat_timeout_s=2.0) as cluster:
        summary = run_job(config, cluster.endpoints["control"], timeout_s=120, keys=cluster.keys)
    np.testing.assert_array_equal(np.array(summary["theta0"]), engine.theta0)
