"""Imperfection models (cost noise, update noise, device variation) and phase compensation."""

import numpy as np
import pytest

from pmgd_node import imperfections as im
from pmgd_node.config import ConfigError, JobConfig
from pmgd_node.node import ParameterNode
from services.engine.engine import Engine


def test_seeded_normal_is_standard_normal_and_a_pure_function():
    x = im.seeded_normal(np.arange(4), 7, np.arange(50_000, dtype=np.uint64))
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    assert abs(np.mean(x[0] * x[1])) < 0.02  # runs independent
    np.testing.assert_array_equal(im.seeded_normal(np.array([2]), 7, np.arange(10, 20, dtype=np.uint64))[0],
                                  x[2, 10:20])


def test_noise_blocks_and_shards_give_the_same_numbers():
    seeds = np.arange(3)
    np.testing.assert_array_equal(im.cost_noise(seeds, 64, 64, 0.5)[:, 36], im.cost_noise(seeds, 100, 1, 0.5)[:, 0])
    whole = im.update_noise(seeds, 9, 0, 10, 10, 0.1)
    np.testing.assert_array_equal(np.hstack([im.update_noise(seeds, 9, 0, 4, 10, 0.1),
                                             im.update_noise(seeds, 9, 4, 10, 10, 0.1)]), whole)
    a, u = im.device_gains(seeds, 0, 10, 0.2)
    a2, u2 = im.device_gains(seeds, 4, 10, 0.2)
    np.testing.assert_array_equal(a[:, 4:], a2)
    assert (a >= 0).all() and 0.1 < np.std(a) < 0.3 and not np.array_equal(a, u)


def _costs(config, ticks=40):
    engine = Engine(config)
    out = []
    for _ in range(ticks):
        engine.step()
        out.append(engine.stage.last_cost.copy())
    return np.array(out), engine


def test_cost_noise_adds_seeded_gaussian_read_out_noise():
    clean, _ = _costs(JobConfig(seeds=3, eta=0.0))
    noisy, _ = _costs(JobConfig(seeds=3, eta=0.0, cost_noise=0.05))
    diff = noisy - clean
    assert 0.03 < diff.std() < 0.07 and abs(diff.mean()) < 0.03
    again, _ = _costs(JobConfig(seeds=3, eta=0.0, cost_noise=0.05))
    np.testing.assert_array_equal(noisy, again)
    single, _ = _costs(JobConfig(seeds=1, eta=0.0, cost_noise=0.05))
    np.testing.assert_array_equal(single[:, 0], noisy[:, 0])  # run 0 of a sweep is the single run


def test_update_noise_and_device_variation_change_the_updates_as_modelled():
    cfg = JobConfig(seeds=2, eta=0.5, tau_theta=1)
    theta0 = np.zeros((2, 9))
    base = ParameterNode(cfg, 9, 0, 9, theta0)
    noisy = ParameterNode(cfg.replace(update_noise=0.01), 9, 0, 9, theta0)
    varied = ParameterNode(cfg.replace(device_variation=0.3), 9, 0, 9, theta0)
    c = np.array([0.2, -0.1])
    for node in (base, noisy, varied):
        node.receive(c, 0)
    np.testing.assert_allclose(noisy.theta0 - base.theta0, im.update_noise(np.arange(2), 0, 0, 9, 9, 0.01))
    a, u = im.device_gains(np.arange(2), 0, 9, 0.3)
    # Given C̃, ε ∝ a and the step ∝ u (in the loop C̃ itself carries a factor a of parameter i).
    np.testing.assert_allclose(varied.theta0, base.theta0 * a * u)


def test_imperfection_fields_are_validated():
    for field, value in (("cost_noise", -1.0), ("update_noise", "x"), ("device_variation", 1.5), ("compensation", -1)):
        with pytest.raises(ConfigError, match=field):
            JobConfig.from_dict({field: value})


def test_compensating_a_known_delay_replays_the_undelayed_correlation_exactly():
    """FM, untagged, delay d: a node that correlates with θ̃[now − d] integrates exactly the
    products of the undelayed system, d ticks later (θ⁰ frozen so that both see the same C̃)."""
    d, ticks = 3, 200
    base = JobConfig(perturbation="fm", mode="analog", eta=0.0, seeds=2, tau_x=10**6, correlation="untagged",
                     max_ticks=ticks, target_accuracy=None)

    def gradients(config, n):
        engine = Engine(config)
        for _ in range(n):
            engine.step()
        return engine.transport.gather_gradient()

    np.testing.assert_array_equal(gradients(base.replace(delay=d, compensation=d), ticks), gradients(base, ticks - d))
    uncompensated = gradients(base.replace(delay=d), ticks)
    assert not np.allclose(uncompensated, gradients(base, ticks - d))
