"""The node-side update rule, integrators and C̃ extraction, on hand-checkable numbers."""

import math

import numpy as np
import pytest

from pmgd_node.config import JobConfig
from pmgd_node.cost_variation import HighPass, SampleAndHold
from pmgd_node.integrator import LowPassIntegrator, MomentumIntegrator, SumIntegrator
from pmgd_node.node import ParameterNode


def test_error_signal_and_discrete_update_every_tau_theta():
    cfg = JobConfig(perturbation="rcm", amplitude=0.1, eta=0.5, tau_theta=3)
    theta0 = np.array([[1.0, 2.0, 3.0]])
    node = ParameterNode(cfg, 9, 3, 6, theta0)
    g = np.zeros((1, 3))
    for t in range(3):
        pert = node.perturbation_at(t)
        np.testing.assert_array_equal(node.effective_weights(t), theta0 + pert)
        c = np.array([0.02 * (t + 1)])
        g += c[:, None] * pert / 0.1**2  # ε = C̃·θ̃/A²
        updated = node.receive(c, t)
        assert updated == (t == 2)
        if t < 2:
            np.testing.assert_allclose(node.gradient, g)
            np.testing.assert_array_equal(node.theta0, theta0)
    np.testing.assert_allclose(node.theta0, theta0 - 0.5 * g)
    np.testing.assert_array_equal(node.gradient, 0.0)  # the sum integrator resets
    assert node.updates == 1


def test_node_rejects_bad_shard():
    with pytest.raises(ValueError, match="shard"):
        ParameterNode(JobConfig(), 9, 5, 12, np.zeros((1, 7)))
    with pytest.raises(ValueError, match="shape"):
        ParameterNode(JobConfig(), 9, 0, 3, np.zeros((2, 3)))


def test_momentum_is_not_reset_and_decays():
    m = MomentumIntegrator((1,), beta=0.5)
    m.accumulate(np.array([1.0]))
    m.after_update()
    m.accumulate(np.array([1.0]))
    assert m.g[0] == pytest.approx(1.5)
    s = SumIntegrator((1,))
    s.accumulate(np.array([1.0]))
    s.after_update()
    assert s.g[0] == 0.0


def test_lowpass_settles_at_tau_times_input_with_time_constant_tau():
    tau = 20.0
    lp = LowPassIntegrator((1,), tau)
    for _ in range(int(tau)):
        lp.accumulate(np.array([1.0]))
    assert lp.g[0] == pytest.approx(tau * (1 - math.exp(-1)), rel=1e-9)
    for _ in range(2000):
        lp.accumulate(np.array([1.0]))
    assert lp.g[0] == pytest.approx(tau)


def test_analog_node_updates_every_tick():
    cfg = JobConfig(perturbation="fm", mode="analog", amplitude=0.1, eta=0.1, tau_theta=5)
    node = ParameterNode(cfg, 4, 0, 4, np.zeros((1, 4)))
    assert node.receive(np.array([0.01]), 0) and node.receive(np.array([0.01]), 1)
    assert node.updates == 2


def test_sample_and_hold():
    sh = SampleAndHold()
    with pytest.raises(RuntimeError):
        sh.variation(np.array([1.0]))
    sh.hold(np.array([1.0, 2.0]))
    np.testing.assert_allclose(sh.variation(np.array([1.5, 1.0])), [0.5, -1.0])


def test_high_pass_removes_dc_keeps_fast_tones():
    hp = HighPass(tau_hp=5.0)
    t = np.arange(4000)
    x = 3.0 + 0.1 * np.sin(2 * np.pi * 0.25 * t)
    y = np.array([hp.variation(np.array([v]))[0] for v in x])
    tail = y[2000:]
    assert abs(tail.mean()) < 1e-3  # the DC level is gone
    # |H(f)| of the discrete RC high-pass at f = 0.25 cycles/tick, α = τ/(τ+1)
    a = 5.0 / 6.0
    z = np.exp(2j * np.pi * 0.25)
    gain = abs(a * (1 - 1 / z) / (1 - a / z))
    assert np.sqrt(2) * tail.std() == pytest.approx(0.1 * gain, rel=0.01)


def test_weight_decay_scales_theta0_by_one_minus_eta_lambda_at_each_update():
    """θ⁰ ← (1 − ηλ)·θ⁰ − η·G, on the update ticks only; λ = 0 leaves the plain rule."""
    theta0 = np.array([[1.0, -2.0, 3.0]])
    plain = ParameterNode(JobConfig(eta=0.5, tau_theta=2), 9, 3, 6, theta0)
    decayed = ParameterNode(JobConfig(eta=0.5, tau_theta=2, weight_decay=0.1), 9, 3, 6, theta0)
    for t in range(2):
        c = np.array([0.03 * (t + 1)])
        plain.receive(c, t)
        decayed.receive(c, t)
        if t == 0:
            np.testing.assert_array_equal(decayed.theta0, theta0)  # no update yet: no decay either
    step = theta0 - plain.theta0  # η·G
    np.testing.assert_allclose(decayed.theta0, (1 - 0.5 * 0.1) * theta0 - step, rtol=0, atol=1e-15)


def test_analog_weight_decay_acts_every_tick():
    cfg = JobConfig(mode="analog", perturbation="cm", eta=0.2, weight_decay=0.5)
    node = ParameterNode(cfg, 4, 0, 4, np.ones((1, 4)))
    for t in range(3):
        node.receive(np.zeros(1), t)  # no cost signal: only the decay moves θ⁰
    np.testing.assert_allclose(node.theta0, (1 - 0.2 * 0.5) ** 3)


def test_eta_decay_uses_eta_over_one_plus_t_over_T_to_the_p_at_each_update():
    """η_t = η/(1 + (t+1)/T)^p at the update closing tick t, with the weight decay scaled alike."""
    theta0 = np.array([[0.5, -1.0]])
    cfg = JobConfig(eta=0.4, eta_decay_ticks=10, eta_decay_power=0.5, weight_decay=0.2, perturbation="cm",
                    amplitude=0.1)
    node = ParameterNode(cfg, 2, 0, 2, theta0)
    expected = theta0.copy()
    for t in range(3):
        c = np.array([0.01 * (t + 1)])
        g = c[:, None] * node.perturbation_at(t) / 0.1**2
        eta_t = 0.4 / (1 + (t + 1) / 10) ** 0.5
        expected = (1 - eta_t * 0.2) * expected - eta_t * g
        node.receive(c, t)
        np.testing.assert_allclose(node.theta0, expected, rtol=0, atol=1e-14)
    constant = ParameterNode(cfg.replace(eta_decay_ticks=0), 2, 0, 2, theta0)
    for t in range(3):
        constant.receive(np.array([0.01 * (t + 1)]), t)
    assert not np.allclose(constant.theta0, node.theta0)  # the schedule changed the steps
