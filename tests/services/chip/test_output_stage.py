"""The output stage's C₀ rule, checked against its meaning: at every perturbed tick the held
C₀ is the cost of the θ⁰ the broadcaster holds, on the input on show.

Driven through the in-process engine (sync and async transports) and through the
broadcaster's ``JobRun`` fed weights by hand, the two drivers of ``OutputStage``.
"""

import numpy as np
import pytest

from pmgd_node import protocol as p
from pmgd_node.config import JobConfig
from services.broadcaster.job import JobRun
from services.engine.engine import Engine


def _assert_c0_is_cost_of_held_theta0(stage, model, held: np.ndarray, tick: int) -> None:
    # C₀ came out of one batch of 2S runs, the check out of S: BLAS may round the two apart
    # in the last bits; a stale C₀ is off by a weight update, orders of magnitude more.
    expected = model.cost(held, stage.batch)
    np.testing.assert_allclose(stage.extractor.c0, expected, rtol=1e-12, atol=1e-15,
                               err_msg=f"held C₀ is not the cost of the held θ⁰ at tick {tick}")


ENGINE_CASES = [
    dict(timing="sync", tau_theta=4, tau_x=2),
    dict(timing="sync", tau_theta=2, tau_x=4),
    dict(timing="async", tau_theta=4, tau_x=4, up_delay=1),
    dict(timing="async", tau_theta=4, tau_x=4, drift=0.05),
    dict(timing="async", tau_theta=1, tau_x=4, up_delay=2, up_jitter=3, drift=0.1),
]


@pytest.mark.parametrize("kw", ENGINE_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_held_c0_is_the_cost_of_the_held_theta0_at_every_tick(kw):
    engine = Engine(JobConfig(nodes=3, seeds=4, eta=0.5, target_accuracy=None, **kw))
    stage, transport = engine.stage, engine.transport
    measure = stage.cost_variation

    def checked(theta0, theta):
        c_tilde = measure(theta0, theta)
        # gather_effective(t) has run: gather_static() is the broadcaster's θ⁰ of this tick.
        _assert_c0_is_cost_of_held_theta0(stage, engine.model, transport.gather_static(), engine.tick)
        return c_tilde

    stage.cost_variation = checked
    start = transport.gather_static().copy()
    for _ in range(200):
        engine.step()
    assert not np.array_equal(transport.gather_static(), start)  # θ⁰ really moved
    # Measured at least once per input and never more than once a tick.
    assert 200 // kw["tau_x"] <= stage.c0_measurements <= 200


def test_broadcaster_job_remeasures_c0_when_any_held_shard_changes():
    """Async on the broadcaster: shards arrive at ticks of their own, some carrying a new θ⁰,
    some the same one again. C₀ is re-measured exactly when the held θ⁰ changed (or the input)."""
    config = JobConfig(nodes=3, seeds=2, timing="async", tick_period=0.01, tau_theta=4, tau_x=4,
                       target_accuracy=None, max_ticks=10_000)
    job = JobRun("j", config)
    job.assignments()
    rng = np.random.default_rng(5)
    static = job.static.copy()
    node_tick = [0] * len(job.shards)
    changes = 0
    for t in range(120):
        measured_before = job.stage.c0_measurements
        changed = False
        for k, (a, b) in enumerate(job.shards):
            if t and rng.random() < 0.5:
                continue  # this shard's next weights are late
            node_tick[k] += 1
            if rng.random() < 0.3:
                static[:, a:b] += rng.normal(scale=0.01, size=(config.seeds, b - a))
                changed = t > 0
            effective = static[:, a:b] + rng.normal(scale=0.1, size=(config.seeds, b - a))
            job.on_weights(p.Weights("j", job.epoch, k, node_tick[k], effective, static[:, a:b].copy()))
        job.advance()
        changes += changed
        _assert_c0_is_cost_of_held_theta0(job.stage, job.model, job.static, t)
        new_input = t % config.tau_x == 0
        assert job.stage.c0_measurements - measured_before == int(changed or new_input), t
    assert changes > 20


@pytest.mark.parametrize("mode", ["discrete", "analog"])
def test_c_tilde_is_clipped_to_the_limit_after_extraction(mode):
    """``c_tilde_limit``: what leaves the stage is the extracted C̃ clipped to ±limit, and the
    limit really bites at this η (some C̃ would be larger)."""
    kw = dict(perturbation="fm", mode="analog", batch=4, eta=0.1, tau_theta=20) if mode == "analog" else {}
    limit = 1e-3
    engine = Engine(JobConfig(seeds=4, amplitude=0.1, target_accuracy=None, c_tilde_limit=limit, **kw))
    raw, sent = [], []
    extract = engine.stage.extractor.variation
    engine.stage.extractor.variation = lambda cost: raw.append(extract(cost).copy()) or raw[-1]
    for _ in range(100):
        sent.append(engine.step())
    raw, sent = np.array(raw), np.array(sent)
    np.testing.assert_array_equal(sent, np.clip(raw, -limit, limit))
    assert (np.abs(raw) > limit).mean() > 0.1


def test_c_tilde_limit_must_be_positive_or_none():
    assert JobConfig().c_tilde_limit is None
    for bad in (0.0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="'c_tilde_limit'"):
            JobConfig(c_tilde_limit=bad)
