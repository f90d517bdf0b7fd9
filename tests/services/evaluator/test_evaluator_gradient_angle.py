"""angle_degrees."""

import numpy as np

from services.evaluator.gradient_angle import angle_degrees


def test_basic_angles():
    assert angle_degrees([1.0, 0.0], [2.0, 0.0]) == 0.0
    assert angle_degrees([1.0, 0.0], [-3.0, 0.0]) == 180.0
    assert angle_degrees([1.0, 0.0], [0.0, 5.0]) == 90.0
    np.testing.assert_allclose(angle_degrees([1.0, 1.0], [1.0, 0.0]), 45.0)


def test_zero_vectors_are_ninety_degrees():
    assert angle_degrees([0.0, 0.0], [1.0, 2.0]) == 90.0
    assert angle_degrees([1.0, 2.0], [0.0, 0.0]) == 90.0
    assert angle_degrees([0.0, 0.0], [0.0, 0.0]) == 90.0


def test_broadcasts_over_leading_axes_and_is_scale_invariant():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(7, 3, 16))
    t = rng.normal(size=(3, 16))
    a = angle_degrees(g, t)
    assert a.shape == (7, 3) and a.dtype == np.float64
    np.testing.assert_allclose(angle_degrees(1e-200 * g, 1e200 * t), a, rtol=1e-10)
    np.testing.assert_allclose(angle_degrees(g, g), 0.0, atol=1e-5)
    # Each angle is arccos of the cosine of its own pair (the leading axes broadcast, the last
    # is the vector), and turning one vector round gives the supplementary angle.
    cos = np.einsum("kri,ri->kr", g, t) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(t, axis=-1))
    np.testing.assert_allclose(a, np.degrees(np.arccos(cos)), atol=1e-9)
    np.testing.assert_allclose(angle_degrees(g, -t), 180.0 - a, atol=1e-9)
