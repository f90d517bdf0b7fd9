"""Contiguous, balanced shards of the global parameter index range."""

from __future__ import annotations


def shard_ranges(num_params: int, nodes: int) -> list[tuple[int, int]]:
    """Split [0, P) into ``nodes`` contiguous ranges whose sizes differ by at most one.

    The first P mod N shards take one extra parameter. Every node must own at least one
    parameter, so N ≤ P.
    """
    if not 1 <= nodes <= num_params:
        raise ValueError(f"nodes must be in [1, {num_params}] (one parameter per node at least); got {nodes}")
    base, extra = divmod(num_params, nodes)
    ranges, start = [], 0
    for k in range(nodes):
        stop = start + base + (1 if k < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges
