"""A client of the broadcaster's control socket: submit a job, follow its progress, send it
control commands, read the broadcaster's state, and fit a job's node count to the nodes the
cluster has.

Every function takes the cluster's ``keys`` (a client key pair, :mod:`pmgd_node.shell.keys`;
None for a broadcaster without them). A broadcaster that refuses the handshake raises
:class:`~pmgd_node.shell.keys.HandshakeRefused` naming the key, rather than a silent timeout.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import zmq

from pmgd_node import protocol as p
from pmgd_node.config import ConfigError, JobConfig
from pmgd_node.shell.keys import Handshake, HandshakeRefused, Keys, connect


class JobFailed(RuntimeError):
    pass


class Cancelled(RuntimeError):
    """The caller stopped following the job (it keeps running on the broadcaster)."""


def _dealer(control: str, keys: Keys | None, linger_ms: int = 0) -> tuple[zmq.Socket, Handshake]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, linger_ms)
    handshake = Handshake(sock, control, keys)
    connect(sock, control, keys)
    return sock, handshake


def _close(sock: zmq.Socket, handshake: Handshake, linger_ms: int = 0) -> None:
    handshake.close()
    sock.close(linger=linger_ms)


def run_job(config: JobConfig, control: str, on_progress: Callable[[dict], None] | None = None,
            timeout_s: float = 3600.0, job_id: str = "", resubmit_s: float = 5.0,
            cancelled: Callable[[], bool] | None = None, keys: Keys | None = None) -> dict:
    """Submit ``config`` to the broadcaster at ``control`` and block until its final result.

    Returns the result summary (the same fields as the in-process engine's, plus the final
    θ⁰, the chained θ⁰ hash ``trail``, epochs, checkpoints and drop counts).
    """
    sock, handshake = _dealer(control, keys)
    job_id = job_id or uuid.uuid4().hex[:12]
    try:
        submit = p.encode(p.Submit(job_id, config.to_dict()))
        sock.send_multipart(submit)
        deadline = time.monotonic() + timeout_s
        heard = time.monotonic()
        while time.monotonic() < deadline:
            if cancelled is not None and cancelled():
                raise Cancelled(job_id)
            if not sock.poll(500):
                if why := handshake.failure():
                    raise HandshakeRefused(why)
                if time.monotonic() - heard > resubmit_s:
                    # Silence: the broadcaster may have restarted. Submitting is idempotent by
                    # job id, so this re-attaches us to the resumed job (or fetches its result).
                    sock.send_multipart(submit)
                    heard = time.monotonic()
                continue
            heard = time.monotonic()
            try:
                msg = p.decode(sock.recv_multipart())
            except p.ProtocolError:
                continue
            if not isinstance(msg, p.Progress) or msg.job != job_id:
                continue
            if msg.final:
                if "error" in msg.data:
                    raise JobFailed(msg.data["error"])
                return msg.data
            if on_progress is not None:
                on_progress(msg.data)
        raise TimeoutError(f"job {job_id} did not finish within {timeout_s:g} s")
    finally:
        _close(sock, handshake)


def send_control(control: str, job_id: str, command: str, reason: str = "", keys: Keys | None = None) -> None:
    """Send the broadcaster at ``control`` a ``Control`` command (pause, resume, stop) for ``job_id``.

    Fire and forget: the broadcaster does not answer a command; its effect shows in the job's
    progress and in :func:`status`. The socket lingers up to a second so the frame leaves.
    """
    sock, handshake = _dealer(control, keys, linger_ms=1000)
    try:
        sock.send_multipart(p.encode(p.Control(job_id, command, reason=reason)))
    finally:
        _close(sock, handshake, linger_ms=1000)


def status(control: str, timeout_s: float = 5.0, keys: Keys | None = None) -> dict:
    """The broadcaster's state: job, nodes (shard, heartbeat age, drops), its own drop counts."""
    sock, handshake = _dealer(control, keys)
    try:
        sock.send_multipart(p.encode(p.Status({})))
        if not sock.poll(int(timeout_s * 1000)):
            if why := handshake.failure():
                raise HandshakeRefused(why)
            raise TimeoutError(f"no status from {control} within {timeout_s:g} s")
        msg = p.decode(sock.recv_multipart())
        if not isinstance(msg, p.Status):
            raise RuntimeError(f"expected a status reply, got {msg.TYPE}")
        return msg.data
    finally:
        _close(sock, handshake)


def fit_to_cluster(fields: dict, control: str, wait_s: float = 10.0, keys: Keys | None = None) -> dict:
    """``fields`` (job-config fields as the user set them) fitted to the cluster at ``control``.

    Only the broadcaster knows how many nodes are connected, so every command that sends a
    job to a running cluster (``pmgd train --cluster``, the API's cluster jobs) asks it here:
    a job that does not set ``nodes`` takes every connected node (none of ``pmgd up --nodes
    N``'s nodes sits idle), and one that asks for more nodes than are connected is refused
    naming the field, rather than waiting for nodes that may never come. Nodes still joining
    get up to ``wait_s`` seconds. Raises RuntimeError when the broadcaster does not answer.
    """
    asked = fields.get("nodes")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            connected = len(status(control, timeout_s=max(1.0, deadline - time.monotonic()), keys=keys)["nodes"])
        except TimeoutError:
            raise RuntimeError(f"the broadcaster at {control} does not answer") from None
        if connected >= (asked or 1) or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if asked is None:
        if connected == 0:
            raise ConfigError("nodes", f"no node is connected to the broadcaster at {control}; start nodes "
                                       "(pmgd node) and submit again")
        return dict(fields, nodes=connected)
    if asked > connected:
        raise ConfigError("nodes", f"the job asks for {asked} nodes but {connected} are connected to the "
                                   f"broadcaster at {control}; set nodes to at most {connected} or start more nodes")
    return fields
