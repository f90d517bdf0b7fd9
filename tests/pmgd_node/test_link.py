"""Link fates and node clocks: pure, seeded, and the block-drawn fates equal the single ones."""

import numpy as np
import pytest

from pmgd_node.link import DOWN, UP, Clock, FateTable, Link


@pytest.mark.parametrize("kw", [dict(), dict(drop=0.3), dict(delay=2, jitter=5),
                                dict(delay=1, jitter=7, drop=0.1, dist="exponential")])
def test_fate_table_gives_exactly_link_fate(kw):
    for node, direction in ((0, DOWN), (3, UP)):
        link = Link(7, node, direction, **kw)
        table = FateTable(link)
        seqs = list(range(700)) + [5, 1000, 3, 299, 2**20 + 5]  # block crossings and jumps back
        assert [table.fate(s) for s in seqs] == [link.fate(s) for s in seqs]


def test_clock_without_drift_is_the_broadcasters():
    clock = Clock(seed=3, node=5, drift=0.0)
    assert clock.rate == 1.0 and clock.phase == 0.0
    assert all(clock.start(k) == k for k in range(-3, 1000))  # exactly, in floating point
    assert [clock.tick_at(t) for t in (0, 0.5, 1, 999.999)] == [0, 0, 1, 999]


def test_clock_rate_and_phase_are_seeded_per_node_within_the_drift():
    clocks = [Clock(seed=11, node=i, drift=0.1) for i in range(200)]
    rates = np.array([c.rate for c in clocks])
    phases = np.array([c.phase for c in clocks])
    assert np.all(np.abs(rates - 1) <= 0.1) and np.ptp(rates) > 0.15
    assert np.all((phases >= 0) & (phases < 1)) and np.ptp(phases) > 0.9
    again = Clock(seed=11, node=7, drift=0.1)
    assert (again.rate, again.phase) == (clocks[7].rate, clocks[7].phase)
    assert Clock(seed=12, node=7, drift=0.1).rate != clocks[7].rate


def test_tick_at_inverts_start():
    for node in range(20):
        clock = Clock(seed=1, node=node, drift=0.3)
        assert clock.start(0) <= 0
        for k in range(0, 3000, 37):
            s, e = clock.start(k), clock.start(k + 1)
            assert clock.tick_at(s) == k
            assert clock.tick_at(np.nextafter(e, -np.inf)) == k
            assert clock.tick_at((s + e) / 2) == k
