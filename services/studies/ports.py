"""Port blocks: every worker process on a machine takes its loopback ports from a block of its own.

A study's points may start servers: the cluster engine's broadcaster (``services.cluster.
launcher.LocalCluster``), the transfer study's reference chips. Both ask
``services.cluster.launcher.free_port`` for a port, which binds port 0, reads the number and
closes the socket: the server binds it a moment later. Two worker processes doing that at
the same time can be handed the same number (the first socket is closed before the server
binds). A worker therefore claims a block of ports first and takes its ports from the block:

* blocks lie below Linux's ephemeral range (32768–60999), so that no ``bind(0)`` anywhere on
  the machine is handed one of their ports;
* a block is claimed by binding its first port and keeping that socket open for the life of
  the process: the operating system itself arbitrates, so two processes (local workers, Dask
  workers, separate ``pmgd study`` runs) can never own the same block;
* within a block the ports are handed out in turn, each checked free by a bind, so a port
  comes round again only after ``SPAN - 1`` others (long after its server has stopped).

:func:`claim` installs the block as ``launcher.free_port`` for the process; the in-process
runner (``--workers 1``) does not call it and keeps the plain ``free_port``.
"""

from __future__ import annotations

import socket

BASE = 20_000  # the first block's first port
SPAN = 250  # ports per block: a point uses a handful (a chip, or a broadcaster's three)
BLOCKS = 50  # blocks 20000–32499: at most this many worker processes per machine
HOST = "127.0.0.1"

_claimed: PortBlock | None = None


def _bindable(port: int) -> socket.socket | None:
    s = socket.socket()
    try:
        s.bind((HOST, port))
    except OSError:
        s.close()
        return None
    return s


class PortBlock:
    """Ports ``first + 1 … first + SPAN - 1`` of a block whose ``first`` port this process holds."""

    def __init__(self) -> None:
        for block in range(BLOCKS):
            first = BASE + block * SPAN
            held = _bindable(first)
            if held is not None:
                self.first, self._held, self._next = first, held, 1
                return
        raise RuntimeError(f"no free port block: all {BLOCKS} blocks of {SPAN} ports from {BASE} are held by other "
                           "worker processes (or other servers) on this machine")

    def free_port(self) -> int:
        """The block's next port that nothing has bound (the drop-in for ``launcher.free_port``)."""
        for _ in range(SPAN - 1):
            port = self.first + self._next
            self._next = self._next % (SPAN - 1) + 1
            probe = _bindable(port)
            if probe is not None:
                probe.close()
                return port
        raise RuntimeError(f"every port of the block {self.first}–{self.first + SPAN - 1} is bound")

    def close(self) -> None:
        self._held.close()


def claim() -> PortBlock:
    """This process's block (claimed on the first call), installed as ``launcher.free_port``."""
    global _claimed
    if _claimed is None:
        from services.cluster import launcher

        _claimed = PortBlock()
        launcher.free_port = _claimed.free_port
    return _claimed
