"""A process without the cluster's keys against a running cluster: it learns nothing and changes nothing.

The stranger knows everything but a key: the endpoints, the job id and the server's public key
(public keys are not secrets). It tries each attack that works on an unauthenticated wire —
read the status, stop or pause the job, join as a node, stream forged weights (at the
current tick and at a far-future one that would pin a shard), listen to C̃ — both without
CurveZMQ and with a key pair of its own that the cluster never authorized.
"""

import json
import subprocess
import sys
import threading

import numpy as np
import zmq.auth
from test_cluster import _assert_identical, _wait_for  # the test directory is on sys.path

from pmgd_node.config import JobConfig
from services.cluster.client import run_job, status
from services.cluster.launcher import LocalCluster

STRANGER = r"""
import json, sys, time
import numpy as np, zmq
from pmgd_node import protocol as p

endpoints, job, server_key = json.loads(sys.argv[1])
ctx = zmq.Context()
heard = {"replies": 0, "cost": 0}
public, secret = zmq.curve_keypair()


def send(sock, msg):
    try:
        sock.send_multipart(p.encode(msg), zmq.NOBLOCK)
    except zmq.Again:  # no connection took its frames (a refused peer has none): try again later
        pass


for curve in (False, True):  # a plain peer, then one with a key pair nobody authorized
    socks = {"control": ctx.socket(zmq.DEALER), "weights": ctx.socket(zmq.PUSH), "cost": ctx.socket(zmq.SUB)}
    for name, sock in socks.items():
        sock.setsockopt(zmq.LINGER, 0)
        if curve:
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = server_key.encode()
        sock.connect(endpoints[name])
    socks["cost"].setsockopt(zmq.SUBSCRIBE, b"")
    control, weights = socks["control"], socks["weights"]
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        send(control, p.Status({}))
        for command in ("pause", "stop"):
            send(control, p.Control(job, command, reason="a stranger"))
        send(control, p.Join("stranger", 1))
        for tick in list(range(0, 4000, 50)) + [2 ** 62]:
            for shard in (0, 1):
                forged = np.full((2, 5), 1e3)
                send(weights, p.Weights(job, 1, shard, tick, forged, forged))
        for name in ("control", "cost"):
            while socks[name].poll(20):
                socks[name].recv_multipart()
                heard["replies" if name == "control" else "cost"] += 1
    for sock in socks.values():
        sock.close(0)
print(json.dumps(heard))
"""


def test_a_stranger_without_keys_reads_nothing_and_the_job_ends_as_the_engine(tmp_path):
    config = JobConfig(nodes=2, seeds=2, max_ticks=6000, target_accuracy=None, eval_every=100, seed=3)
    with LocalCluster(2, log_dir=str(tmp_path)) as cluster:
        progress, box = [], {}

        def follow():
            box["summary"] = run_job(config, cluster.endpoints["control"], lambda d: progress.append(d["tick"]),
                                     timeout_s=240, job_id="target-job", keys=cluster.keys)

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        _wait_for(lambda: progress and progress[-1] >= 200, 120, "the job to pass tick 200")
        server_key = zmq.auth.load_certificate(f"{cluster.keys_dir}/server.key")[0].decode()
        stranger = subprocess.run(
            [sys.executable, "-c", STRANGER, json.dumps([cluster.endpoints, "target-job", server_key])],
            capture_output=True, text=True, timeout=60)
        assert stranger.returncode == 0, stranger.stderr
        during = progress[-1]
        st = status(cluster.endpoints["control"], keys=cluster.keys)
        thread.join(240)
        assert "summary" in box, "the job did not finish"
    assert during < config.max_ticks, "the attack must overlap the job"
    assert json.loads(stranger.stdout) == {"replies": 0, "cost": 0}  # it learned nothing
    assert sorted(st["nodes"]) == ["node-0", "node-1"] and st["dropped"] == {}  # no frame of it was parsed
    summary = box["summary"]
    assert summary["epochs"] == 1 and summary["dropped"] == {}  # never paused, stopped or rolled back
    _assert_identical(summary, config)  # θ⁰ bit for bit at every tick
    log = (tmp_path / "broadcaster.log").read_text()
    assert "refused a connection: client key" in log  # the stranger's own key pair was seen and refused
    assert np.isfinite(summary["final_cost_median"])
