"""A broadcaster killed (−9) mid-job and restarted with its --state-dir: the job resumes under
one new epoch, whatever the nodes queued while it was down, and ends on exactly the engine's θ⁰."""

import json
import signal
import threading
import time

import numpy as np
import pytest

from pmgd_node.config import JobConfig
from services.cluster.client import run_job, status
from services.cluster.launcher import LocalCluster
from services.engine.engine import Engine

_references: dict[str, tuple] = {}


def _engine(config: JobConfig):
    """The engine's result and final θ⁰ (the reference every restarted job must end on), once per config."""
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _references:
        engine = Engine(config)
        _references[key] = engine.run(), engine.theta0
    return _references[key]


def _assert_ends_on_the_engines_weights(summary: dict, config: JobConfig) -> None:
    result, theta0 = _engine(config)
    np.testing.assert_array_equal(np.array(summary["theta0"]), theta0)  # bit for bit
    assert summary["ticks_run"] == result.ticks
    assert summary["converged"] == int(result.solved.sum())


def _run_in_thread(config: JobConfig, cluster: LocalCluster, resubmit_s: float = 5.0):
    box = {}

    def target():
        try:
            box["summary"] = run_job(config, cluster.endpoints["control"], timeout_s=120, resubmit_s=resubmit_s,
                                     keys=cluster.keys)
        except Exception as err:  # surfaced by the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _restart_broadcaster(cluster: LocalCluster, log_dir) -> int:
    """Start the broadcaster again; the offset of its log in the file both runs append to."""
    offset = (log_dir / "broadcaster.log").stat().st_size
    cluster.start_broadcaster()
    return offset


@pytest.mark.slow
@pytest.mark.parametrize("down_s", [0.0, 4.0], ids=["restarted-at-once", "down-past-the-nodes-timeout"])
def test_a_restarted_broadcaster_resumes_the_job_under_exactly_one_new_epoch(tmp_path, down_s):
    """While the broadcaster is down each node queues heartbeats (and, once its broadcaster
    timeout of 3 s has passed, a Join of its own); the restarted broadcaster hears them all in
    one burst. It used to answer every heartbeat with "rejoin" and take every further Join
    for a node that had lost its shard: 2 to 4 assignments after a restart at once, 7 to 23
    after 4 s down (measured). Now it asks once, and the Assign supersedes every Join that
    left before it: one assignment, from the checkpoint on disk, and the engine's θ⁰ at the end."""
    config = JobConfig(nodes=2, seeds=2, max_ticks=3000, target_accuracy=None, checkpoint_every=200,
                       eval_every=50, seed=4)
    log_dir, state_dir = tmp_path / "logs", tmp_path / "state"
    with LocalCluster(2, heartbeat_timeout_s=2.0, state_dir=str(state_dir), log_dir=str(log_dir)) as cluster:
        assert down_s == 0 or down_s > cluster.heartbeat_timeout_s * 1.5  # the nodes' broadcaster timeout
        thread, box = _run_in_thread(config, cluster)

        def checkpointed():
            st = status(cluster.endpoints["control"], keys=cluster.keys)
            return st["job"] is not None and st["job"]["checkpoint_tick"] >= 200 and st["checkpoints_saved"] >= 1

        _wait_for(checkpointed, 120, "a checkpoint on disk at tick 200 or later")
        cluster.broadcaster.send_signal(signal.SIGKILL)
        cluster.broadcaster.wait()
        time.sleep(down_s)
        offset = _restart_broadcaster(cluster, log_dir)
        thread.join(240)
        assert "error" not in box, box.get("error")
        summary = box["summary"]
    _assert_ends_on_the_engines_weights(summary, config)
    log = (log_dir / "broadcaster.log").read_bytes()[offset:].decode()
    assert "resuming job" in log and log.count("running from tick") == 1 and "re-joined" not in log, log
    assert summary["epochs"] == 2, log  # the first run's epoch, and the one assignment after the restart
