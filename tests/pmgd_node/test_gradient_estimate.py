"""The size of the gradient estimate: a node alone, fed C̃ of a known smooth cost.

E[ε_i] = ∂C/∂θ_i is the project's convention (docs/architecture.md §1), so the long-run mean of ε must
match ∇C in direction *and norm*; a wrong ⟨θ̃²⟩ (e.g. A² for FM instead of A²/2) scales every
ε by the same factor and leaves the direction alone, so only the norm catches it.

The cost is a quadratic C(θ) = ½θᵀHθ + bᵀθ on P = 16 parameters, ∇C = Hθ + b, and the node
owns all of them with θ⁰ frozen (η = 0, no update within the trace). The mean ε is read from
the integrated G over N ticks: G/N. N = 4096 is a whole number of periods of every periodic
type (TM: P = 16, CM: code length 32, FM: with the default band [0, ½] the tones sit at
(2k+1)/64 cycles per tick, so every cross term f_i ± f_j is a nonzero multiple of 1/32 and
cancels over 64 ticks), and long enough that R-CM's random cross-talk (relative size
√((P−1)/N) ≈ 0.06) averages down. The O(A) curvature term of C̃ is negligible at A = 10⁻³.
"""

from __future__ import annotations

import numpy as np
import pytest

from pmgd_node.config import JobConfig
from pmgd_node.cost_variation import HighPass, SampleAndHold
from pmgd_node.node import ParameterNode

P, S, N, A = 16, 4, 4096, 1e-3


def quadratic(seed: int = 1):
    """A fixed well-conditioned quadratic: H symmetric positive definite, b and θ⁰ per run."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(P, P))
    h = m @ m.T / P + np.eye(P)
    b = rng.normal(size=P)
    theta0 = rng.uniform(-0.5, 0.5, size=(S, P))
    return h, b, theta0


def cost(h, b, theta):
    """C(θ) per run: ½θᵀHθ + bᵀθ, θ (S, P) → (S,)."""
    return 0.5 * np.einsum("si,ij,sj->s", theta, h, theta) + theta @ b


def config(kind: str, **extra) -> JobConfig:
    analog = kind == "fm"
    # τ_θ far beyond N: no discrete update fires; the analog lowpass (gain τ(1 − e^{−1/τ}) ≈ 1,
    # decay e^{−1/τ} ≈ 1) then integrates as a plain sum, to a relative 10⁻⁵ over N ticks.
    return JobConfig(perturbation=kind, mode="analog" if analog else "discrete", amplitude=A, eta=0.0,
                     tau_theta=10**9, seeds=S, **extra)


def mean_epsilon(cfg: JobConfig, extract, h, b, theta0) -> np.ndarray:
    """G/N after N ticks of C̃ = extract(C(θ⁰ + θ̃[t])) heard by a node owning all P parameters."""
    node = ParameterNode(cfg, P, 0, P, theta0)
    for t in range(N):
        node.receive(extract(cost(h, b, node.effective_weights(t))), t)
    np.testing.assert_array_equal(node.theta0, theta0)  # frozen
    return node.gradient / N


def sample_and_hold(h, b, theta0):
    held = SampleAndHold()
    held.hold(cost(h, b, theta0))
    return held.variation


def assert_matches(estimate: np.ndarray, expected: np.ndarray, cos_min: float = 0.99, norm_tol: float = 0.1):
    """Per run: cosine(estimate, expected) > cos_min and ‖estimate‖/‖expected‖ within 1 ± norm_tol."""
    cos = np.sum(estimate * expected, axis=1) / (np.linalg.norm(estimate, axis=1) * np.linalg.norm(expected, axis=1))
    ratio = np.linalg.norm(estimate, axis=1) / np.linalg.norm(expected, axis=1)
    assert np.all(cos > cos_min), f"cosine {cos} not above {cos_min}"
    assert np.all(np.abs(ratio - 1) < norm_tol), f"norm ratio {ratio} not within 1 ± {norm_tol}"


@pytest.mark.parametrize("kind", ["tm", "cm", "rcm", "fm"])
def test_mean_epsilon_with_sample_and_hold_is_the_gradient(kind):
    """Discrete extraction C̃ = C(θ⁰ + θ̃) − C(θ⁰): mean ε = ∇C for every type (FM included:
    the node's rule does not depend on how C̃ was extracted)."""
    h, b, theta0 = quadratic()
    grad = theta0 @ h + b
    assert_matches(mean_epsilon(config(kind), sample_and_hold(h, b, theta0), h, b, theta0), grad)


def highpass(tau_hp: float):
    """Analog extraction: the node hears the high-passed C(t) (starting at rest)."""
    return HighPass(tau_hp).variation


@pytest.mark.parametrize("tau_hp", [1.0, 2.0, 8.0])
def test_analog_fm_mean_epsilon_is_scaled_by_each_tones_highpass_gain_unless_corrected(tau_hp):
    """Analog FM: the high-pass passes tone i with in-phase gain Re H(f_i), so by default mean
    ε = diag(Re H(f_i))·∇C, tilted away from ∇C; with ``fm_gain_correction`` each node divides by
    its own gain and mean ε = ∇C in direction and norm, at any τ_hp."""
    from pmgd_node.cost_variation import highpass_gain

    h, b, theta0 = quadratic()
    grad = theta0 @ h + b
    plain = mean_epsilon(config("fm", tau_hp=tau_hp), highpass(tau_hp), h, b, theta0)
    node = ParameterNode(config("fm", tau_hp=tau_hp), P, 0, P, theta0)
    gain = highpass_gain(node.perturbation.freq, tau_hp)
    assert gain.min() > 0.01  # no tone of P = 16 is clipped at these τ_hp (GAIN_FLOOR)
    assert_matches(plain, gain * grad, cos_min=0.999, norm_tol=0.01)
    corrected = mean_epsilon(config("fm", tau_hp=tau_hp, fm_gain_correction=True), highpass(tau_hp), h, b, theta0)
    assert_matches(corrected, grad, cos_min=0.999, norm_tol=0.01)
    # Uncorrected, direction and norm are measurably off (cosines 0.80–0.99 at τ_hp = 1, 0.89–0.99
    # at 2, 0.977–0.9996 at 8; norm ratios 0.40–0.57, 0.55–0.74, 0.85–0.93).
    cos = np.sum(plain * grad, axis=1) / (np.linalg.norm(plain, axis=1) * np.linalg.norm(grad, axis=1))
    assert cos.min() < 0.99 and np.median(np.linalg.norm(plain, axis=1) / np.linalg.norm(grad, axis=1)) < 0.95


def test_fm_gain_correction_clips_tones_below_the_floor():
    """Tones near f = 0 have Re H → 0: a node divides by at most 1/GAIN_FLOOR, never more."""
    from pmgd_node.cost_variation import GAIN_FLOOR, corrected_gain, highpass_gain

    f = np.array([0.0, 0.001, 0.01, 0.25, 0.5])
    np.testing.assert_array_equal(corrected_gain(f, 2.0), np.maximum(highpass_gain(f, 2.0), GAIN_FLOOR))
    assert corrected_gain(f, 2.0)[0] == GAIN_FLOOR and corrected_gain(f, 2.0)[-1] == pytest.approx(0.8)
    # In a node, one C̃ by hand: ε_i = C̃·θ̃_i/(A²/2 · max(Re H(f_i), GAIN_FLOOR)), all tones below 0.01.
    cfg = config("fm", fm_gain_correction=True, fm_band=(0.0, 0.01))
    theta0 = np.zeros((S, P))
    node = ParameterNode(cfg, P, 3, 9, theta0[:, 3:9])
    c = np.array([0.5, -1.0, 2.0, 0.25])
    node.hear(c, 7, 7)
    pert = node.perturbation.values(7, 3, 9)
    want = c[:, None] * pert / (A**2 / 2 * corrected_gain(node.perturbation.freq[:, 3:9], cfg.tau_hp))
    np.testing.assert_allclose(node.gradient, want * node.integrator.gain, rtol=1e-12)
    assert np.any(highpass_gain(node.perturbation.freq[:, 3:9], cfg.tau_hp) < GAIN_FLOOR)
