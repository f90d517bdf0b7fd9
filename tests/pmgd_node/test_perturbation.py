"""Each perturbation's defining property, and sharding independence."""

import numpy as np
import pytest

from pmgd_node.perturbation import CodeMultiplexed, FrequencyMultiplexed, RandomCode, TimeMultiplexed, make_perturbation
from pmgd_node.sharding import shard_ranges

SEEDS = np.array([0, 1, 17])
A = 0.1


def full(p, t0, count):
    return p.block(t0, count, 0, p.num_params)  # (T, S, P)


@pytest.mark.parametrize("P", [1, 9, 16, 100])
def test_cm_rows_orthogonal_over_a_code_period(P):
    p = CodeMultiplexed(P, SEEDS, A)
    L = p.period
    assert L > P and L & (L - 1) == 0 and L // 2 <= P
    for t0 in (0, 5 * L + 3):  # any window of one full period
        codes = full(p, t0, L)[:, 0, :]  # (L, P)
        gram = codes.T @ codes
        np.testing.assert_allclose(gram, L * A**2 * np.eye(P), atol=1e-12)
        np.testing.assert_allclose(codes.sum(axis=0), 0.0, atol=1e-12)  # the all-ones row is skipped
    assert set(np.unique(codes)) == {-A, A}


@pytest.mark.parametrize("P", [1, 9, 50])
def test_tm_visits_each_parameter_once_per_period(P):
    p = TimeMultiplexed(P, SEEDS, A)
    for t0 in (0, 3 * P + 2):
        vals = full(p, t0, P)  # (P, S, P)
        assert np.all((vals == 0) | (vals == A))
        np.testing.assert_array_equal((vals != 0).sum(axis=2), 1)  # one parameter per tick
        np.testing.assert_array_equal((vals != 0).sum(axis=0), 1)  # each parameter once per period
    assert p.power == pytest.approx(A**2 / P)


def test_tm_order_is_shuffled_by_seed():
    p = TimeMultiplexed(50, SEEDS, A)
    assert not np.array_equal(p.slot[0], p.slot[1])
    assert not np.array_equal(p.slot[0], np.arange(50))


def test_rcm_zero_mean_and_uncorrelated():
    P, T = 32, 20000
    p = RandomCode(P, np.array([3]), A)
    codes = full(p, 0, T)[:, 0, :] / A  # ±1
    assert set(np.unique(codes)) == {-1.0, 1.0}
    # Mean and cross-correlations of independent ±1 fall as 1/√T: allow 5σ.
    assert np.abs(codes.mean(axis=0)).max() < 5 / np.sqrt(T)
    corr = codes.T @ codes / T
    off = corr[~np.eye(P, dtype=bool)]
    assert np.abs(off).max() < 5 / np.sqrt(T)
    np.testing.assert_allclose(np.diag(corr), 1.0)
    # ... and in time: consecutive ticks are uncorrelated too.
    assert abs(np.mean(codes[1:] * codes[:-1])) < 5 / np.sqrt(T * P)


def test_rcm_differs_between_runs_and_ticks():
    p = RandomCode(64, SEEDS, A)
    v = full(p, 0, 2)
    assert not np.array_equal(v[0, 0], v[0, 1])
    assert not np.array_equal(v[0, 0], v[1, 0])


@pytest.mark.parametrize("band", [(0.0, 0.5), (0.1, 0.3)])
def test_fm_frequencies_unique_and_in_band(band):
    P = 200
    p = FrequencyMultiplexed(P, SEEDS, A, band)
    for s in range(len(SEEDS)):
        f = p.freq[s]
        assert len(np.unique(np.round(f, 12))) == P
        assert np.all((f > band[0]) & (f < band[1]))
    # Time-averaged power A²/2, and distinct tones are orthogonal over a long window.
    vals = full(p, 0, 40000)[:, 0, :20]
    np.testing.assert_allclose((vals**2).mean(axis=0), A**2 / 2, rtol=0.02)
    gram = vals.T @ vals / len(vals) / (A**2 / 2)
    assert np.abs(gram[~np.eye(20, dtype=bool)]).max() < 0.05


@pytest.mark.parametrize("kind", ["tm", "cm", "rcm", "fm"])
@pytest.mark.parametrize("nodes", [2, 3, 7])
def test_sharding_independence(kind, nodes):
    P = 23
    p = make_perturbation(kind, P, SEEDS, A)
    whole = p.block(100, 40, 0, P)
    parts = np.concatenate([p.block(100, 40, a, b) for a, b in shard_ranges(P, nodes)], axis=-1)
    np.testing.assert_array_equal(whole, parts)
    # A generator built for another node holds the same values (no hidden state).
    again = make_perturbation(kind, P, SEEDS, A)
    np.testing.assert_array_equal(again.block(100, 40, 5, 11), whole[..., 5:11])
    # Ticks are addressable in any order and block size.
    np.testing.assert_array_equal(p.values(117, 4, 9), whole[17, :, 4:9])


def test_run_axis_is_independent_of_batch_composition():
    P = 12
    for kind in ("tm", "rcm", "fm"):
        alone = make_perturbation(kind, P, np.array([17]), A).block(0, 30, 0, P)
        together = make_perturbation(kind, P, SEEDS, A).block(0, 30, 0, P)
        np.testing.assert_array_equal(together[:, 2:3], alone)


def test_shard_ranges_contiguous_balanced():
    for P, n in [(9, 1), (9, 2), (9, 4), (26154, 8), (5, 5)]:
        r = shard_ranges(P, n)
        assert r[0][0] == 0 and r[-1][1] == P
        assert all(a[1] == b[0] for a, b in zip(r, r[1:]))
        sizes = [b - a for a, b in r]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="nodes"):
        shard_ranges(3, 4)
