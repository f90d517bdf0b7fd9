"""`pmgd up` and cluster jobs as a newcomer meets them (issue 11): it says what it starts, a
job that does not set ``nodes`` runs on every node, and the summary's wall time is the run's."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pmgd_node.config import ConfigError
from pmgd_node.shell import keys as cluster_keys
from services.api.jobs import FINAL
from services.cluster.client import fit_to_cluster, status

ROOT = Path(__file__).resolve().parents[3]
PMGD = shutil.which("pmgd") or os.path.join(os.path.dirname(sys.executable), "pmgd")


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _train(*args, timeout=180):
    return subprocess.run([PMGD, "train", "--quiet", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.slow
def test_pmgd_up_reports_its_steps_and_jobs_without_nodes_take_every_node(tmp_path):
    proc = subprocess.Popen([PMGD, "up", "--nodes", "2", f"--db={tmp_path / 'pmgd.sqlite'}"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines, found = [], {}
        while not lines or "pid" not in lines[-1]:
            line = proc.stdout.readline()
            assert line, f"pmgd up ended early: {lines}"
            lines.append(line.strip())
            words = line.split()
            if words and words[0] in ("keys", "control", "api"):
                found[words[0]] = words[1]
                if words[0] == "control":  # endpoints are printed once the cluster is ready
                    # with the keys it made, printed before them (the cluster's links are encrypted)
                    assert len(status(words[1], keys=cluster_keys.load(found["keys"]))["nodes"]) == 2
        # What it starts, as it goes: before anything is ready, then the endpoints.
        assert lines[0] == "starting the broadcaster…", lines
        first_endpoint = next(i for i, line in enumerate(lines) if line.startswith("keys"))
        for step in ("starting node 1/2…", "starting node 2/2…", "starting the API…", "2/2 nodes joined"):
            assert step in lines[:first_endpoint], (step, lines)
        control, api = found["control"], found["api"]

        # Over REST: a config without "nodes" runs on both nodes.
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps({"task": "parity2", "seeds": 2, "max_ticks": 200, "target_accuracy": None}))
        r = subprocess.run([PMGD, "jobs", "--api", api, "submit", str(job_file), "--engine", "cluster"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip()
        _wait_for(lambda: _get(f"{api}/jobs/{job_id}")["state"] in FINAL, 120, "the REST job to end")
        job = _get(f"{api}/jobs/{job_id}")
        assert job["state"] == "finished", job
        assert job["config"]["nodes"] == 2
        series = _get(f"{api}/jobs/{job_id}/metrics")["series"]
        assert {"staleness.0", "staleness.1"} <= series.keys()  # a shard on each node

        # Without the keys: a clear error naming what to set, not a silent wait.
        r = _train("--engine", "cluster", "--cluster", control, "--keys", "", "--max-ticks", "100", timeout=60)
        assert r.returncode == 1 and "requires the cluster's keys (set PMGD_KEYS" in r.stderr, r.stderr

        # pmgd train --cluster: unset nodes → every node; an explicit count is kept.
        for extra, nodes in (([], 2), (["--nodes", "1"], 1)):
            out = tmp_path / f"train-{nodes}.json"
            r = _train("--engine", "cluster", "--cluster", control, "--keys", found["keys"], "--seeds", "2",
                       "--max-ticks", "100", "--json", str(out), *extra)
            assert r.returncode == 0, r.stderr
            assert json.loads(out.read_text())["config"]["nodes"] == nodes

        # More nodes than are connected: refused, naming the field.
        with pytest.raises(ConfigError, match=r"'nodes'.*asks for 3 nodes but 2 are connected"):
            fit_to_cluster({"task": "parity2", "nodes": 3}, control, wait_s=0.5, keys=cluster_keys.load(found["keys"]))

        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_cluster_summary_wall_time_counts_the_whole_run(tmp_path):
    """The summary's wall time is what the user waited for (here: starting two node processes
    included), not only the broadcaster's share; the ticks alone are the training time."""
    t0 = time.monotonic()
    r = subprocess.run([PMGD, "train", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    start_up = time.monotonic() - t0  # the interpreter and the CLI's imports: not measurable from inside
    assert r.returncode == 0

    out = tmp_path / "cluster.json"
    t0 = time.monotonic()
    r = _train("--engine", "cluster", "--nodes", "2", "--seeds", "2", "--max-ticks", "300", "--json", str(out))
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    summary = json.loads(out.read_text())
    slack = 2 * start_up + 0.5
    assert elapsed - slack <= summary["wall_time_s"] <= elapsed, (summary["wall_time_s"], elapsed, slack)
    assert 0 < summary["training_time_s"] <= summary["wall_time_s"]
    assert "wall time" in r.stderr and "training time" in r.stderr

    local = tmp_path / "local.json"
    r = _train("--seeds", "2", "--max-ticks", "300", "--json", str(local))
    assert r.returncode == 0, r.stderr
    summary = json.loads(local.read_text())  # the same two times on the in-process engine
    assert 0 < summary["training_time_s"] <= summary["wall_time_s"]
