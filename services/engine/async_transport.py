"""The async in-memory transport: every node ticks on its own clock (docs/architecture.md §2, "async").

Virtual time is measured in broadcaster ticks: broadcaster tick t happens at time t. Node i
runs its own clock (``pmgd_node.link.Clock``): local tick k starts at s_i(k) = (k − φ_i)/r_i.

Node i, starting local tick k (at time s_i(k)):
    close tick k−1: hear every C̃ that arrived at a time < s_i(k), then end_tick(k−1)
    publish its shard (θ⁰, θ⁰ + θ̃[k], k) on the uplink: fate = up.fate(k);
        dropped → never arrives, else it arrives at s_i(k) + delay

Broadcaster tick t:
    advance every node through its local ticks with s_i(k) ≤ t
    hold, per node, the newest shard (highest k) that has arrived by time t
    gather_effective / gather_static read the held shards' θ⁰ + θ̃[k] and θ⁰
    publish C̃[t] to node i tagged with k_i(t), the local tick of its held shard:
        fate = down.fate(t); dropped, or arrival a = t + delay, heard when node i
        closes the local tick containing a, as node.hear(C̃, tag=k_i(t), now=that tick)

So tagged nodes correlate C̃ with the perturbation that produced it, however stale, and
untagged nodes with the one current at arrival. Before a node's first shard arrives the
broadcaster holds its tick-0 shard: the job set-up hands it the initial θ⁰, and θ̃[0] is a
pure function of (seed, index, 0).

With drift 0 and ideal links every shard is used at the tick it was made (k_i(t) = t) and
every C̃ is heard in the tick it was measured: the sync transport's schedule exactly, and
with drift 0 and any downlink model the sync transport's schedule with the same links.
"""

from __future__ import annotations

import heapq

import numpy as np

from pmgd_node.link import Clock, FateTable, node_links
from pmgd_node.node import ParameterNode


class _NodeEnd:
    """One node, its clock and links, and the broadcaster's view of it."""

    __slots__ = ("node", "clock", "down", "up", "next_tick", "closed", "inbox", "in_flight",
                 "held", "dropped", "up_dropped")

    def __init__(self, node: ParameterNode, clock: Clock, down, up):
        self.node, self.clock, self.down, self.up = node, clock, down, up
        self.next_tick = 0  # local tick the node starts next
        self.closed = -1  # last local tick closed (heard its C̃, applied its update)
        # C̃ in flight to the node: (arrival, tag, broadcaster tick, C̃); the broadcaster tick
        # breaks ties so arrays are never compared, and keeps sync's (arrival, tag) order.
        self.inbox: list = []
        self.in_flight: list[tuple[float, int, np.ndarray, np.ndarray]] = []  # shards (arrival, k, θ⁰, θ⁰+θ̃)
        self.held: tuple[int, np.ndarray, np.ndarray] | None = None  # (k, θ⁰, θ⁰+θ̃[k]) the broadcaster uses
        self.dropped = 0
        self.up_dropped = 0

    def close(self, k: int) -> None:
        """Close local tick k: hear what arrived before s(k+1), then the node's update if due."""
        end = self.clock.start(k + 1)
        inbox, node = self.inbox, self.node
        while inbox and inbox[0][0] < end:
            _, tag, _, c_tilde = heapq.heappop(inbox)
            node.hear(c_tilde, tag, k)
        node.end_tick(k)
        self.closed = k

    def start(self, k: int) -> None:
        """Start local tick k: close k−1 if still open, then send the shard of tick k."""
        if self.closed < k - 1:
            self.close(k - 1)
        # θ⁰ is updated in place by the node: the shard in flight must hold a copy.
        shard = (k, self.node.theta0.copy(), self.node.effective_weights(k))
        self.next_tick = k + 1
        if k == 0:
            self.held = shard
            return
        delay = self.up.fate(k)
        if delay is None:
            self.up_dropped += 1
        else:
            self.in_flight.append((self.clock.start(k) + delay, *shard))

    def advance(self, t: int) -> None:
        """Run the node through every local tick starting at or before t; hold the newest shard."""
        while self.clock.start(self.next_tick) <= t:
            self.start(self.next_tick)
        if not self.in_flight:
            return
        newest = self.held[0]
        for arrival, k, theta0, eff in self.in_flight:
            if arrival <= t and k > newest:
                newest, self.held = k, (k, theta0, eff)
        # Shards older than the held one can never be used again.
        self.in_flight = [s for s in self.in_flight if s[1] > newest]

    def close_finished(self, t: int) -> None:
        """After C̃[t] is sent: close the open local tick if it ends by t + 1.

        Every later C̃ arrives at t + 1 or after, so nothing can still reach a tick that ends
        by then; closing it now (not when the next tick starts) lets θ⁰ read between
        broadcaster ticks match sync's, which updates at the end of each tick.
        """
        k = self.next_tick - 1
        if self.closed < k and self.clock.start(k + 1) <= t + 1:
            self.close(k)


class AsyncTransport:
    """Nodes on their own drifting clocks, links applied in virtual time; InMemoryTransport's interface."""

    def __init__(self, nodes: list[ParameterNode], config):
        self.nodes = sorted(nodes, key=lambda n: n.start)
        self.ends = []
        for i, node in enumerate(self.nodes):
            down, up = node_links(config, i)
            clock = Clock(config.seed, i, config.link(i)["drift"])
            self.ends.append(_NodeEnd(node, clock, FateTable(down), FateTable(up)))
        self._now = 0  # broadcaster tick in progress
        self._advanced = -1  # time the nodes have been advanced to

    def _advance(self, t: int) -> None:
        if t != self._advanced:
            for end in self.ends:
                end.advance(t)
            self._advanced = t

    def _gather(self, parts: list[np.ndarray]) -> np.ndarray:
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

    def gather_effective(self, tick: int) -> np.ndarray:
        """θ⁰ + θ̃[k_i] of the newest shard of every node that has arrived by ``tick``, (S, P)."""
        self._now = tick
        self._advance(tick)
        return self._gather([end.held[2] for end in self.ends])

    def gather_static(self) -> np.ndarray:
        """θ⁰ of the same shards (the broadcaster's view, for C₀ measurements), (S, P)."""
        self._advance(self._now)
        return self._gather([end.held[1] for end in self.ends])

    def node_static(self) -> np.ndarray:
        """θ⁰ the nodes hold now, (S, P) (diagnostics and evaluation: not what the broadcaster sees)."""
        return self._gather([n.theta0 for n in self.nodes])

    def gather_gradient(self) -> np.ndarray:
        """G from every node, (S, P) (diagnostics only: hardware never collects it)."""
        return self._gather([n.gradient for n in self.nodes])

    def publish(self, c_tilde: np.ndarray, tick: int) -> None:
        """Send C̃[tick] to every node, tagged with the local tick of the shard it was measured on."""
        self._advance(tick)
        for end in self.ends:
            delay = end.down.fate(tick)
            if delay is None:
                end.dropped += 1
            else:
                heapq.heappush(end.inbox, (tick + delay, end.held[0], tick, c_tilde))
            end.close_finished(tick)
        self._now = tick + 1

    @property
    def dropped(self) -> list[int]:
        """C̃ messages each node's downlink has lost so far."""
        return [end.dropped for end in self.ends]

    @property
    def up_dropped(self) -> list[int]:
        """Shards each node's uplink has lost so far."""
        return [end.up_dropped for end in self.ends]

    @property
    def used_ticks(self) -> list[int]:
        """Local tick of the shard the broadcaster holds for each node (its staleness, read off t)."""
        return [end.held[0] for end in self.ends]
