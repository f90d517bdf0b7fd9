"""The in-memory transport: the in-process twin of the ZeroMQ links.

Nodes are plain objects; "sending" effective weights is concatenating their shards in
global index order and "broadcasting" C̃ is calling every node with it. The cluster
replaces this class with sockets; nothing else in the engine changes.
"""

from __future__ import annotations

import numpy as np

from pmgd_node.link import FateTable, Receiver, node_links
from pmgd_node.node import ParameterNode


class InMemoryTransport:
    """Lock-step links in virtual time; each node's downlink applies its link model in ticks."""

    def __init__(self, nodes: list[ParameterNode], config=None):
        self.nodes = sorted(nodes, key=lambda n: n.start)
        # Fates drawn a block of ticks at a time: the same numbers, a fraction of the hashing.
        links = [FateTable(node_links(config, i)[0]) for i in range(len(self.nodes))] if config is not None else []
        self.receivers = [Receiver(n, link) for n, link in zip(self.nodes, links)]
        self._ideal = all(link.ideal for link in links)

    def _gather(self, parts: list[np.ndarray]) -> np.ndarray:
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

    def gather_effective(self, tick: int) -> np.ndarray:
        """θ⁰ + θ̃[tick] from every node, (S, P)."""
        return self._gather([n.effective_weights(tick) for n in self.nodes])

    def gather_static(self) -> np.ndarray:
        """θ⁰ from every node, (S, P) (for C₀ measurements and evaluation)."""
        return self._gather([n.theta0 for n in self.nodes])

    # Lock-step: the broadcaster's θ⁰ is the nodes' θ⁰ (AsyncTransport tells them apart).
    node_static = gather_static

    def gather_gradient(self) -> np.ndarray:
        """G from every node, (S, P) (diagnostics only: hardware never collects it)."""
        return self._gather([n.gradient for n in self.nodes])

    def publish(self, c_tilde: np.ndarray, tick: int) -> None:
        """Broadcast C̃[tick]; every node then closes tick ``tick`` with what has arrived."""
        if self._ideal:
            for node in self.nodes:
                node.receive(c_tilde, tick)
            return
        for rx in self.receivers:
            rx.offer(c_tilde, tick, tick)
            rx.close_tick(tick)

    @property
    def dropped(self) -> list[int]:
        """C̃ messages each node's downlink has lost so far."""
        return [rx.dropped for rx in self.receivers]
