"""The in-memory transport: the in-process twin of the ZeroMQ links.

Nodes are plain objects; "sending" effective weights is concatenating their shards in
global index order and "broadcasting" C̃ is calling every node with it. The cluster
replaces this class with sockets; nothing else in the engine changes.
"""

from __future__ import annotations

import numpy as np

from pmgd_node.node import ParameterNode


class InMemoryTransport:
    def __init__(self, nodes: list[ParameterNode]):
        self.nodes = sorted(nodes, key=lambda n: n.start)

    def _gather(self, parts: list[np.ndarray]) -> np.ndarray:
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

    def gather_effective(self, tick: int) -> np.ndarray:
        """θ⁰ + θ̃[tick] from every node, (S, P)."""
        return self._gather([n.effective_weights(tick) for n in self.nodes])

    def gather_static(self) -> np.ndarray:
        """θ⁰ from every node, (S, P) (for C₀ measurements and evaluation)."""
        return self._gather([n.theta0 for n in self.nodes])

    def gather_gradient(self) -> np.ndarray:
        """G from every node, (S, P) (diagnostics only: hardware never collects it)."""
        return self._gather([n.gradient for n in self.nodes])

    def publish(self, c_tilde: np.ndarray, tick: int) -> None:
        for node in self.nodes:
            node.receive(c_tilde, tick)
