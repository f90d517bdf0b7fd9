"""Link models: what a message suffers between a node and the broadcaster (docs/architecture.md §2).

Each direction of each node's link delays, jitters and drops messages as a pure function
of (job seed, node, direction, message sequence number), so the in-process engine and the
cluster draw exactly the same fates:

    dropped  with probability p                     (u₁ < p)
    delay  = d + j,  j ~ uniform{0…J}               (jitter_dist "uniform")
                    j = round(−J·ln(1 − u₂))        (jitter_dist "exponential", mean ≈ J)

Delays are in ticks: the engine applies them in virtual time, the sync cluster in ticks on
the receiving node, the async cluster as ticks × τ_p of wall time.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from .perturbation import seeded_uniform

_LINK_STREAM = 0x4C494E4B  # "LINK"
DOWN, UP = 0, 1


class Link:
    """The fate of message ``seq`` on one direction of one node's link."""

    def __init__(self, seed: int, node: int, direction: int, delay: int = 0, jitter: int = 0,
                 drop: float = 0.0, dist: str = "uniform"):
        self.delay, self.jitter, self.drop, self.dist = int(delay), int(jitter), float(drop), dist
        self._seeds = np.array([seed])
        self._stream = _LINK_STREAM ^ (node << 1 | direction) << 32
        self.ideal = self.delay == 0 and self.jitter == 0 and self.drop == 0.0

    def fate(self, seq: int) -> int | None:
        """Ticks of delay for message ``seq``, or None if the link loses it."""
        if self.ideal:
            return 0
        u_drop, u_jit = seeded_uniform(self._seeds, self._stream, np.array([2 * seq, 2 * seq + 1]))[0]
        return self.decide(u_drop, u_jit)

    def decide(self, u_drop: float, u_jit: float) -> int | None:
        """The fate drawn from message ``seq``'s two uniforms (the module docstring's rule)."""
        if u_drop < self.drop:
            return None
        if self.jitter == 0:
            return self.delay
        if self.dist == "uniform":
            return self.delay + int(u_jit * (self.jitter + 1))
        return self.delay + int(round(-self.jitter * math.log1p(-u_jit)))


def node_links(config, node: int) -> tuple[Link, Link]:
    """(downlink, uplink) of node ``node`` under ``config`` (a JobConfig) and its overrides."""
    f = config.link(node)
    down = Link(config.seed, node, DOWN, f["delay"], f["jitter"], f["drop"], config.jitter_dist)
    up = Link(config.seed, node, UP, f["up_delay"], f["up_jitter"], f["up_drop"], config.jitter_dist)
    return down, up


class DelayLine:
    """Messages in flight, released in order of arrival tick, ties by the tick they carry,
    then in the order they were sent (async: one shard's tick can tag two C̃ values)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, object]] = []
        self._sent = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, arrival: int, tag: int, payload: object) -> None:
        heapq.heappush(self._heap, (arrival, tag, self._sent, payload))
        self._sent += 1

    def due(self, now: int):
        """Yield (tag, payload) of every message arriving at or before ``now``."""
        while self._heap and self._heap[0][0] <= now:
            _, tag, _, payload = heapq.heappop(self._heap)
            yield tag, payload

    def pending(self) -> list[tuple[int, int, object]]:
        """(arrival, tag, payload) of every message in flight, in release order."""
        return [(a, t, v) for a, t, _, v in sorted(self._heap, key=lambda e: e[:3])]


class Receiver:
    """A node's end of its downlink: C̃ values in flight until their arrival tick.

    ``offer`` is called when the broadcaster sends C̃ (tagged with its tick); ``close_tick``
    when the node's tick ``now`` ends: every value that has arrived by then is heard (in
    arrival order), then the node applies its update if one is due. With an ideal link this
    is exactly ``node.receive(c, t)``.
    """

    def __init__(self, node, link: Link):
        self.node, self.link = node, link
        self.line = DelayLine()
        self.dropped = 0

    def offer(self, c_tilde, tag: int, now: int, seq: int | None = None) -> None:
        delay = self.link.fate(tag if seq is None else seq)
        if delay is None:
            self.dropped += 1
        else:
            self.line.push(now + delay, tag, c_tilde)

    def close_tick(self, now: int) -> bool:
        for tag, c_tilde in self.line.due(now):
            self.node.hear(c_tilde, tag, now)
        return self.node.end_tick(now)


_CLOCK_STREAM = 0x434C4F4B  # "CLOK"


class Clock:
    """A node's tick clock, read in broadcaster ticks (async timing, docs/architecture.md §2).

    Node ``node`` runs at rate r and phase φ, both seeded by (job seed, node) alone:

        r = 1 + drift·(2u − 1),   u ~ U[0, 1)
        φ ~ U[0, 1)               (φ = 0 when drift = 0, so an ideal clock is the broadcaster's)
        s(k) = (k − φ)/r          the time its local tick k starts; s(0) = −φ/r ≤ 0

    Local tick k spans [s(k), s(k+1)). With drift 0, s(k) = k exactly (in floating point
    too), which is what makes async timing without drift reproduce sync bit for bit.
    """

    def __init__(self, seed: int, node: int, drift: float = 0.0):
        self.drift = float(drift)
        u, phase = seeded_uniform(np.array([seed]), _CLOCK_STREAM, np.array([2 * node, 2 * node + 1]))[0]
        if self.drift == 0.0:
            self.rate, self.phase = 1.0, 0.0
        else:
            self.rate, self.phase = 1.0 + self.drift * (2.0 * float(u) - 1.0), float(phase)

    def start(self, k: int) -> float:
        """s(k): the broadcaster time at which local tick k starts."""
        return (k - self.phase) / self.rate

    def tick_at(self, time: float) -> int:
        """The local tick containing ``time``: the k with s(k) ≤ time < s(k+1)."""
        k = math.floor(time * self.rate + self.phase)
        # ⌊x·r + φ⌋ can miss by one in floating point; settle it with the same s() as everyone.
        while self.start(k) > time:
            k -= 1
        while self.start(k + 1) <= time:
            k += 1
        return k


class FateTable:
    """``link.fate(seq)`` with the hashes drawn a block of sequence numbers at a time.

    Messages on a link are numbered consecutively (ticks), and one vectorised
    ``seeded_uniform`` over a block costs about as much as one call for a single message.
    The uniforms are elementwise pure functions of (seed, stream, index), so every fate is
    exactly ``link.fate(seq)`` (a test holds the two side by side). Duck-types as a Link.
    """

    BLOCK = 256

    def __init__(self, link: Link):
        self.link = link
        self.ideal = link.ideal
        self.delay, self.jitter, self.drop, self.dist = link.delay, link.jitter, link.drop, link.dist
        self._first = None
        self._u: list[float] = []

    def fate(self, seq: int) -> int | None:
        if self.ideal:
            return 0
        first = seq - seq % self.BLOCK
        if first != self._first:
            index = np.arange(2 * first, 2 * (first + self.BLOCK))
            self._u = seeded_uniform(self.link._seeds, self.link._stream, index)[0].tolist()
            self._first = first
        i = 2 * (seq - first)
        return self.link.decide(self._u[i], self._u[i + 1])  # Link.fate's rule on the same numbers
