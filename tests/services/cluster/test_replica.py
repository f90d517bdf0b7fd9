"""The replica uplink on the real cluster (issue 17; docs/cluster.md, "The replica uplink").

A sync job with ``uplink = "replica"`` is bit-identical to the engine, as with the full
uplink (the default, which test_cluster.py covers), under every option whose θ̃ the broadcaster
regenerates; what a node sends between updates does not grow with P; an async job falls back
to the full uplink; and a node whose θ⁰ changes outside an update (one parameter changed,
injected into the node processes only) is caught at the next tick, resynchronised, and the job
ends exactly where the engine with the same fault ends, while a node whose checksums never
match stops the job with a message that says so.
"""

import hashlib
import os
import textwrap

import numpy as np
import pytest

from pmgd_node.config import JobConfig
from services.cluster.client import JobFailed, run_job
from services.cluster.launcher import LocalCluster
from services.engine.engine import Engine


def engine_reference(config: JobConfig, fault=None):
    """The engine's final θ⁰ and chained hash of θ⁰ at the start of every tick; ``fault``
    (index, tick) adds 1 to θ⁰ of run 0 at that global index after the node closes that tick."""
    engine = Engine(config)
    if fault is not None:
        _inject(engine.nodes, *fault)
    trail = hashlib.sha256()
    step = engine.step

    def hashed_step():
        trail.update(engine.theta0.tobytes())
        return step()

    engine.step = hashed_step
    engine.run()
    return engine.theta0, trail.hexdigest()


def _inject(nodes, index: int, tick: int) -> None:
    for node in nodes:
        if node.start <= index < node.stop:
            end_tick = node.end_tick

            def faulty(t, node=node, end_tick=end_tick):
                changed = end_tick(t)
                if t == tick:
                    node.theta0[0, index - node.start] += 1.0  # a device drifts, off the update path
                return changed

            node.end_tick = faulty


# The same fault inside the node processes (and nothing else: the broadcaster imports no node).
SITECUSTOMIZE = textwrap.dedent('''
    import os, sys
    if "node" in sys.argv and os.environ.get("PMGD_TEST_FLIP"):
        index, tick = map(int, os.environ["PMGD_TEST_FLIP"].split(":"))
        from pmgd_node import node as _node

        _end_tick = _node.ParameterNode.end_tick

        def end_tick(self, t):
            changed = _end_tick(self, t)
            if t == tick and self.start <= index < self.stop:
                self.theta0[0, index - self.start] += 1.0
            return changed

        _node.ParameterNode.end_tick = end_tick
    if "node" in sys.argv and os.environ.get("PMGD_TEST_BAD_CHECKSUM"):
        from pmgd_node import protocol as _p

        _p.checksum = lambda theta0: "0123456789abcdef"  # a node that cannot sum its θ⁰
''')


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(3, heartbeat_timeout_s=2.0) as c:
        yield c


def _fault_env(tmp_path, **env) -> dict:
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p), **env}


def _between_updates(summary) -> float:
    """Mean bytes of an uplink message that carried no θ⁰."""
    return (summary["uplink_bytes"] - summary["uplink_state_bytes"]) / \
        (summary["uplink_messages"] - summary["uplink_state_messages"])


@pytest.mark.parametrize("uplink", ["replica", "full"])
@pytest.mark.parametrize("config", [
    JobConfig(perturbation="rcm", nodes=3, seeds=2, max_ticks=200, tau_theta=3, seed=5),
    JobConfig(perturbation="tm", nodes=2, seeds=2, max_ticks=200, tau_theta=2, seed=1),
    JobConfig(perturbation="cm", nodes=3, seeds=2, max_ticks=200, device_variation=0.2, update_noise=0.002,
              cost_noise=0.01, correlation="untagged", delay=1, compensation=1, drop=0.1, seed=4),
    JobConfig(perturbation="fm", mode="analog", nodes=3, seeds=2, max_ticks=200, fm_gain_correction=True, seed=2),
    JobConfig(nodes=1, seeds=3, max_ticks=200, weight_decay=0.05, eta_decay_ticks=50, c_tilde_limit=0.01,
              integrator="momentum", momentum_decay=0.9, tau_theta=2, seed=6),
], ids=["rcm", "tm", "cm-links-imperfections-untagged", "fm-analog", "one-node-decay-clip-momentum"])
def test_both_uplinks_are_bit_identical_to_the_engine(cluster, config, uplink):
    config = config.replace(uplink=uplink, target_accuracy=None)
    summary = run_job(config, cluster.endpoints["control"], timeout_s=120, keys=cluster.keys)
    theta0, trail = engine_reference(config)
    np.testing.assert_array_equal(np.array(summary["theta0"]), theta0)  # bit for bit
    assert summary["trail"] == trail  # and θ⁰ at the start of every tick
    assert summary["uplink"] == uplink and summary["resyncs"] == []
    if uplink == "replica" and config.mode == "discrete":  # θ⁰ goes up only after an update (or the start),
        # or with a resend: a node that heard nothing for resend_s (a loaded machine) resends with θ⁰
        expected = config.nodes * (1 + config.max_ticks // config.tau_theta)
        assert expected <= summary["uplink_state_messages"] <= expected + 3


def test_a_cnn_float32_job_is_bit_identical_with_the_replica(cluster, tmp_path):
    from services.evaluator.data import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path, n_train=100, n_test=50, seed=0)
    config = JobConfig(task="fmnist", data_dir=str(tmp_path), batch=5, amplitude=0.01, eta=0.01, nodes=3,
                       max_ticks=30, eval_every=15, target_accuracy=None, seed=3, tau_theta=5, uplink="replica")
    summary = run_job(config, cluster.endpoints["control"], timeout_s=120, keys=cluster.keys)
    theta0, trail = engine_reference(config)
    assert theta0.dtype == np.float32
    np.testing.assert_array_equal(np.array(summary["theta0"], dtype=np.float32), theta0)
    assert summary["trail"] == trail and summary["uplink"] == "replica"


def test_what_a_node_sends_between_updates_does_not_grow_with_p(cluster):
    """Between updates a replica digest is a header (tick, checksum), whatever the shard's size;
    the full uplink sends θ⁰ + θ̃ of the shard every tick."""
    sizes = {}
    for network in ("2-2-1", "2-300-1"):  # P = 9 and 1,201
        for uplink in ("replica", "full"):
            config = JobConfig(network=network, nodes=3, max_ticks=120, tau_theta=4, target_accuracy=None,
                               uplink=uplink)
            sizes[network, uplink] = _between_updates(
                run_job(config, cluster.endpoints["control"], timeout_s=120, keys=cluster.keys))
    assert sizes["2-2-1", "replica"] < 120 and sizes["2-300-1", "replica"] < 120
    assert abs(sizes["2-300-1", "replica"] - sizes["2-2-1", "replica"]) < 8  # the same header (±digits)
    assert sizes["2-300-1", "full"] > 8 * 1201 / 3  # a shard of float64, every tick


def test_an_async_job_sends_its_full_weights(cluster):
    config = JobConfig(nodes=2, timing="async", tick_period=0.002, max_ticks=200, target_accuracy=None,
                       uplink="replica")
    summary = run_job(config, cluster.endpoints["control"], timeout_s=120, keys=cluster.keys)
    assert summary["uplink"] == "full" and summary["uplink_state_messages"] == summary["uplink_messages"]


def test_a_parameter_flipped_on_a_node_is_caught_within_a_tick_and_resynchronised(tmp_path):
    """Node-side θ⁰ of one parameter jumps by 1 after tick 100 closes (no update there: τ_θ = 2).
    The next digest's checksum disagrees with the broadcaster's replica, which asks for the θ⁰
    and trains on it: the job ends bit for bit on the engine's θ⁰ with the same fault, and its
    θ⁰ trail matches at every tick. The full uplink gets θ⁰ + θ̃ from the node but θ⁰ only at
    the next update: at tick 101 it measures C₀ (τ_x = 1: a new input every tick) on a θ⁰ no
    node holds, and ends elsewhere."""
    index, tick = 5, 100
    config = JobConfig(nodes=3, seeds=2, max_ticks=300, tau_theta=2, seed=9, target_accuracy=None, eval_every=50,
                       uplink="replica")
    theta0, trail = engine_reference(config, fault=(index, tick))
    clean, _ = engine_reference(config)
    assert not np.array_equal(theta0, clean)  # the fault does change the trajectory
    with LocalCluster(3, heartbeat_timeout_s=2.0, env=_fault_env(tmp_path, PMGD_TEST_FLIP=f"{index}:{tick}")) as c:
        replica = run_job(config, c.endpoints["control"], timeout_s=120, keys=c.keys)
        full = run_job(config.replace(uplink="full"), c.endpoints["control"], timeout_s=120, keys=c.keys)
    shard = index // 3  # 9 parameters over 3 nodes: 3 each
    assert replica["resyncs"] == [[tick + 1, shard]]  # caught at the first tick after the fault
    np.testing.assert_array_equal(np.array(replica["theta0"]), theta0)
    assert replica["trail"] == trail and replica["epochs"] == 1
    assert full["resyncs"] == [] and full["trail"] != trail
    assert not np.array_equal(np.array(full["theta0"]), theta0)


def test_a_node_whose_checksum_never_matches_stops_the_job_with_the_reason(tmp_path):
    config = JobConfig(nodes=2, max_ticks=100, target_accuracy=None, uplink="replica")
    with LocalCluster(2, heartbeat_timeout_s=2.0, env=_fault_env(tmp_path, PMGD_TEST_BAD_CHECKSUM="1")) as c:
        with pytest.raises(JobFailed, match=r"checksum at tick 0 disagrees with the broadcaster's replica 4 times"):
            run_job(config, c.endpoints["control"], timeout_s=60, keys=c.keys)
        # the full uplink sends no checksum: the same nodes train
        summary = run_job(config.replace(uplink="full"), c.endpoints["control"], timeout_s=60, keys=c.keys)
    assert summary["ticks_run"] == 100
