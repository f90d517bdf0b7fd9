"""`docker compose up` for real: the cluster as a compose user meets it, checked through its
published ports (`make test-compose`; deselected from the plain test run by its marker).

One compose project with three nodes serves every check: a REST cluster job ends on the
in-process engine's θ⁰; a node's process killed with SIGKILL mid-job is restarted by compose,
rejoins, and the job still ends bit-identical; `docker compose restart api` mid-job loses no
job; the dashboard, `/metrics` and the evaluator's scoring answer; `docker compose down -v`
leaves no container, network or volume of the project.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pmgd_node.config import JobConfig
from services.engine.engine import Engine

pytestmark = pytest.mark.compose

ROOT = Path(__file__).resolve().parents[2]
PROJECT = f"pmgdtest{os.getpid()}"
TOKEN = "compose-test-token"
PORTS = {"PMGD_API_PORT": "18000", "PMGD_EVALUATOR_PORT": "18001", "PMGD_CONTROL_PORT": "15555"}
API = f"http://127.0.0.1:{PORTS['PMGD_API_PORT']}"
SERVICES = ["keys", "evaluator", "broadcaster", "node", "api"]  # Prometheus and Grafana need pulled images


def _compose(*args: str, env: dict, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "compose", "-p", PROJECT, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=check)


def _http(method: str, path: str, body: dict | None = None, raw: bool = False):
    req = urllib.request.Request(API + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        data = r.read()
        return data if raw else json.loads(data)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (OSError, urllib.error.URLError, ValueError):
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The compose project, up with three nodes; torn down with its volumes, and checked gone."""
    data = tmp_path_factory.mktemp("data")
    env = dict(os.environ, PMGD_NODES="3", PMGD_API_TOKEN=TOKEN, PMGD_DATA=str(data), **PORTS)
    started = time.monotonic()
    up = _compose("up", "-d", "--no-build", "--wait", "--wait-timeout", "300", *SERVICES, env=env, check=False)
    if up.returncode != 0:
        logs = _compose("logs", "--no-color", "--tail", "40", env=env, check=False).stdout
        _compose("down", "-v", "--remove-orphans", env=env, check=False)
        pytest.fail(f"docker compose up failed:\n{up.stderr}\n{logs}")
    print(f"compose up: healthy in {time.monotonic() - started:.0f} s")
    try:
        yield env
    finally:
        _compose("down", "-v", "--remove-orphans", "--timeout", "10", env=env, check=False)
    label = f"label=com.docker.compose.project={PROJECT}"
    for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
        left = subprocess.run(["docker", *kind, "-q", "--filter", label], capture_output=True, text=True).stdout
        assert left.strip() == "", f"docker compose down -v left {kind[0]} behind: {left}"


def _engine_theta0(config: JobConfig) -> np.ndarray:
    engine = Engine(config)
    engine.run()
    return engine.theta0


def _submit(config: JobConfig) -> str:
    job = _http("POST", "/jobs", {"config": config.to_dict(), "engine": "cluster", "start": True})
    return job["id"]


def _finished(job_id: str, timeout: float = 300) -> dict:
    job = _wait(lambda: (j := _http("GET", f"/jobs/{job_id}"))["state"] in ("finished", "failed", "stopped") and j,
                timeout, f"job {job_id} to end")
    assert job["state"] == "finished" and job["error"] == "", job
    return job


def _checkpoint_theta0(job_id: str) -> np.ndarray:
    with np.load(io.BytesIO(_http("GET", f"/jobs/{job_id}/checkpoint", raw=True))) as z:
        return z["theta0"]


def _node_pids(env: dict) -> list[int]:
    """Host pids of the pmgd node processes (children of each node container's init)."""
    ids = _compose("ps", "-q", "node", env=env).stdout.split()
    pids = []
    for cid in ids:
        init = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", cid], capture_output=True,
                              text=True, check=True).stdout.strip()
        children = subprocess.run(["pgrep", "-P", init], capture_output=True, text=True).stdout.split()
        pids += [int(c) for c in children]
    return pids


def _progress(job_id: str) -> int:
    series = _http("GET", f"/jobs/{job_id}/metrics")["series"]
    return int(series["cost"][-1][0]) if series.get("cost") else 0


def test_a_rest_job_ends_on_the_engines_weights(cluster):
    config = JobConfig(nodes=3, seeds=3, max_ticks=1500, seed=7)
    job_id = _submit(config)
    job = _finished(job_id)
    assert job["config"]["nodes"] == 3
    np.testing.assert_array_equal(_checkpoint_theta0(job_id), _engine_theta0(config))  # bit for bit


def test_a_node_killed_mid_job_is_restarted_and_the_job_ends_bit_identical(cluster):
    config = JobConfig(nodes=3, seeds=2, max_ticks=20_000, target_accuracy=None, checkpoint_every=500,
                       eval_every=250, seed=8)
    job_id = _submit(config)
    _wait(lambda: _progress(job_id) >= 1000, 180, "the job to pass tick 1000")
    pids = _node_pids(cluster)
    assert len(pids) == 3, pids
    os.kill(pids[0], signal.SIGKILL)  # the process, from the host: compose's restart policy answers
    _wait(lambda: len(_node_pids(cluster)) == 3 and pids[0] not in _node_pids(cluster), 120,
          "compose to restart the node")
    job = _finished(job_id, timeout=600)
    assert job["summary"]["epochs"] >= 2  # the job rolled back to its checkpoint once the node re-joined
    np.testing.assert_array_equal(_checkpoint_theta0(job_id), _engine_theta0(config))


def test_restarting_the_api_mid_job_loses_no_job(cluster):
    config = JobConfig(nodes=3, seeds=2, max_ticks=12_000, target_accuracy=None, eval_every=250, seed=9)
    job_id = _submit(config)
    _wait(lambda: _progress(job_id) >= 500, 180, "the job to pass tick 500")
    _compose("restart", "api", env=cluster)
    job = _finished(job_id, timeout=600)
    assert job["summary"]["ticks_run"] == config.max_ticks
    np.testing.assert_array_equal(_checkpoint_theta0(job_id), _engine_theta0(config))


def test_the_dashboard_metrics_and_the_evaluators_scoring_answer(cluster):
    done = next(j for j in _http("GET", "/jobs") if j["state"] == "finished")
    with urllib.request.urlopen(API + "/dashboard", timeout=30) as r:
        assert r.status == 200 and b"<html" in r.read().lower()
    with urllib.request.urlopen(API + "/metrics", timeout=30) as r:
        assert b"pmgd_api" in r.read()
    score = _http("POST", f"/jobs/{done['id']}/evaluate", {"split": "test"})
    assert 0.0 <= score["accuracy"] <= 1.0, score
