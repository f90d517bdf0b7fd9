"""A broadcaster killed (−9) mid-job and restarted with its --state-dir: the job resumes under
one new epoch, whatever the nodes queued while it was down, and a kill at any step of a
checkpoint write leaves the old checkpoint or the new one, so the job still ends on exactly
the engine's θ⁰."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from test_cluster import _wait_for  # the test directory is on sys.path

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


# Written into a directory put first on the broadcaster's PYTHONPATH: Python imports it at
# start-up, so the real process, unchanged, runs with its file operations watched.
SITECUSTOMIZE = '''
"""Kill this process (os._exit(137): no cleanup, as kill -9) just before the first
CRASH_BEFORE operation of the CRASH_WRITE-th file written into CRASH_DIR; log every first
operation of each write to CRASH_TRACE as "<write> <operation>"."""

import builtins
import os

_dir = os.path.abspath(os.environ["CRASH_DIR"])
_write, _before, _trace = int(os.environ["CRASH_WRITE"]), os.environ["CRASH_BEFORE"], os.environ["CRASH_TRACE"]
_real_open, _real_fsync, _real_replace = builtins.open, os.fsync, os.replace
_real_os_open, _real_os_close = os.open, os.close
_writes = 0  # files opened for writing in _dir so far: the current write is the last
_seen = set()  # operations of the current write already logged
_fds = {}  # fd -> "" (a written file) or "_dir" (the directory)


def _inside(path):
    path = os.path.abspath(os.fspath(path))
    return path == _dir or path.startswith(_dir + os.sep)


def _op(name):
    if name in _seen:  # the first of its kind in a write counts: all of a file's write() calls are one
        return
    _seen.add(name)
    with _real_open(_trace, "a") as f:
        f.write(f"{_writes} {name}\\n")
    if _writes == _write and name == _before:
        os._exit(137)


class _Watched:
    def __init__(self, f):
        self._f = f

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write(self, data):
        _op("write")
        return self._f.write(data)

    def flush(self):
        _op("flush")
        self._f.flush()

    def close(self):
        _op("close")
        _fds.pop(self._f.fileno(), None)
        self._f.close()


def _open(file, mode="r", *args, **kwargs):
    global _writes
    if not isinstance(file, int) and any(c in mode for c in "wax+") and _inside(file):
        _writes += 1
        _seen.clear()
        _op("open")
        f = _Watched(_real_open(file, mode, *args, **kwargs))
        _fds[f.fileno()] = ""
        return f
    return _real_open(file, mode, *args, **kwargs)


def _fsync(fd):
    if fd in _fds:
        _op("fsync" + _fds[fd])
    _real_fsync(fd)


def _replace(src, dst, *args, **kwargs):
    if _inside(dst):
        _op("replace")
    _real_replace(src, dst, *args, **kwargs)


def _os_open(path, flags, *args, **kwargs):
    if _writes and os.path.abspath(os.fspath(path)) == _dir:
        _op("open_dir")
        fd = _real_os_open(path, flags, *args, **kwargs)
        _fds[fd] = "_dir"
        return fd
    return _real_os_open(path, flags, *args, **kwargs)


def _os_close(fd):
    if _fds.get(fd) == "_dir":
        _op("close_dir")
        del _fds[fd]
    _real_os_close(fd)


builtins.open, os.fsync, os.replace, os.open, os.close = _open, _fsync, _replace, _os_open, _os_close
'''

# The file operations of one checkpoint write (services/state_file.save_state), in order.
STEPS = ("open", "write", "flush", "fsync", "close", "replace", "open_dir", "fsync_dir", "close_dir")
CHECKPOINT_EVERY = 50


@pytest.mark.slow
@pytest.mark.parametrize("write", [1, 2], ids=["first-checkpoint", "second-checkpoint"])
@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_of_a_checkpoint_write_leaves_a_job_that_ends_on_the_engines_weights(
        tmp_path, write, step):
    """The real broadcaster killed just before one file operation of its first or second
    checkpoint write, then restarted without the injection. Until the rename the disk holds
    the previous checkpoint (none before the first: the client's resubmission starts the job
    over), from it the new one; either way the restarted job ends bit for bit on the engine's
    θ⁰. A refused checkpoint would show as "refusing to resume" in the log: never expected."""
    config = JobConfig(nodes=1, seeds=2, max_ticks=300, target_accuracy=None, checkpoint_every=CHECKPOINT_EVERY,
                       eval_every=25, seed=7)
    inject, state_dir, log_dir, trace = tmp_path / "inject", tmp_path / "state", tmp_path / "logs", tmp_path / "trace"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    crash = {"PYTHONPATH": os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p),
             "CRASH_DIR": str(state_dir), "CRASH_WRITE": str(write), "CRASH_BEFORE": step, "CRASH_TRACE": str(trace)}
    with LocalCluster(1, state_dir=str(state_dir), log_dir=str(log_dir), env=crash) as cluster:
        thread, box = _run_in_thread(config, cluster, resubmit_s=0.5)
        assert cluster.broadcaster.wait(60) == 137, "the broadcaster did not reach the injected step"
        for name in crash:  # the restart runs as in production
            del cluster.env[name]
        cluster.env.update({name: os.environ[name] for name in crash if name in os.environ})
        offset = _restart_broadcaster(cluster, log_dir)
        thread.join(120)
        assert "error" not in box, box.get("error")
        summary = box["summary"]
    # It died just before the chosen operation, and a checkpoint write is exactly these operations.
    earlier = [f"1 {s}" for s in STEPS] if write == 2 else []
    done = [f"{write} {s}" for s in STEPS[:STEPS.index(step) + 1]]
    assert trace.read_text().splitlines() == earlier + done, trace.read_text()
    renamed = STEPS.index(step) > STEPS.index("replace")
    on_disk = (write - 1 + renamed) * CHECKPOINT_EVERY  # tick of the checkpoint the restart found (0: none)
    log = (log_dir / "broadcaster.log").read_bytes()[offset:].decode()
    assert "refusing to resume" not in log, log
    if on_disk:
        assert f"from its checkpoint at tick {on_disk}\n" in log, log
    else:
        assert "resuming job" not in log, log
    _assert_ends_on_the_engines_weights(summary, config)
    assert summary["epochs"] == (2 if on_disk else 1), log
    assert (state_dir / f"result-{summary['job']}.json").exists() and not (state_dir / "job.npz").exists()
