"""The size of the gradient estimate: a node alone, fed C̃ of a known smooth cost.

E[ε_i] = ∂C/∂θ_i is the project's convention (DESIGN §1), so the long-run mean of ε must
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
