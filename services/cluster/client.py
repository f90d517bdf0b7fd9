"""A client of the broadcaster's control socket: submit a job, follow its progress."""

from __future__ import annotations

import time
import uuid
from typing import Callable

import zmq

from pmgd_node import protocol as p
from pmgd_node.config import JobConfig


class JobFailed(RuntimeError):
    pass


def run_job(config: JobConfig, control: str, on_progress: Callable[[dict], None] | None = None,
            timeout_s: float = 3600.0, job_id: str = "") -> dict:
    """Submit ``config`` to the broadcaster at ``control`` and block until its final result.

    Returns the result summary (the same fields as the in-process engine's, plus the final
    θ⁰, the chained θ⁰ hash ``trail``, epochs, checkpoints and drop counts).
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(control)
    job_id = job_id or uuid.uuid4().hex[:12]
    try:
        sock.send_multipart(p.encode(p.Submit(job_id, config.to_dict())))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not sock.poll(500):
                continue
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
        sock.close(linger=0)
