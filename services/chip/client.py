"""The trainer's side of the chip protocol (docs/chip-protocol.md): one DEALER to one chip.

A job whose forward passes run on a chip (``JobConfig.chip``, or the broadcaster's
``evaluator``) holds one :class:`ChipClient`. The output stage calls :meth:`ChipClient.cost`
every tick with θ⁰ + θ̃ of every run and the indices of the training samples on show; the
chip job calls :meth:`ChipClient.evaluate` at every evaluation, on the evaluation set. Requests
go strictly in turn, each answered or given up before the next.

One request, ``timeout_s`` = T and ``retries`` = R::

    send (seq n) ─ wait ≤ T ─┬─ reply with seq n ──────────────▶ done
                             ├─ no reply ─▶ send again as seq n+1 (at most R times), then ChipError
                             ├─ error "unknown_job" ─▶ hello, then send again (counts as a try)
                             ├─ error "busy" ─▶ send again (counts as a try)
                             ├─ error "bad_request" ─▶ ChipError at once (it cannot succeed)
                             └─ a refused CurveZMQ handshake ─▶ ChipError at once, saying which key

A reply to an earlier seq (one we gave up on) is stale and ignored; a malformed frame is
dropped and counted in ``dropped`` by reason (``protocol.CHIP_DROP_REASONS``). A request thus
waits at most (R + 1)·T, plus the hellos an "unknown_job" answer asks for. ``stats`` counts
requests, re-sends, timeouts and hellos (tests, reports).

Keys: with ``keys`` (the cluster's, ``pmgd_node/shell/keys.py``) the DEALER is a CurveZMQ client
of the chip's server key, exactly as every other client of the cluster; without them it
connects in the clear (loopback chips).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import zmq

from pmgd_node import protocol as p
from pmgd_node.config import JobConfig
from pmgd_node.shell import keys as cluster_keys


class ChipError(RuntimeError):
    """The chip did not answer in time, refused our key, or refused a request: the message
    names the endpoint, the request, how long we waited and what happened."""


@dataclasses.dataclass(frozen=True)
class ChipInfo:
    """What a chip says of itself in its hello reply."""

    params: int  # P: the length of one run's θ
    samples: dict  # {"train": N, "test": M}
    outputs: int  # O: outputs per sample
    name: str


class ChipClient:
    """``cost(theta, indices)`` and ``evaluate(theta, indices, split)`` on one chip.

    ``config`` (optional) travels in the hello, so that a chip that serves many jobs (``pmgd
    evaluator``) can load the job's model and data; ``job_id`` names the job to the chip.
    """

    def __init__(self, endpoint: str, job_id: str, config: JobConfig | None = None, timeout_s: float = 10.0,
                 retries: int = 3, keys: cluster_keys.Keys | None = None):
        if not isinstance(endpoint, str) or not endpoint:
            raise ValueError("chip endpoint must be a non-empty string like tcp://HOST:PORT")
        if not isinstance(job_id, str) or not 1 <= len(job_id) <= p.CHIP_MAX_JOB:
            raise ValueError(f"chip job id must be a string of 1 to {p.CHIP_MAX_JOB} characters, got {job_id!r}")
        if not 0 < timeout_s <= 3600:
            raise ValueError(f"chip timeout_s must be in (0, 3600] seconds, got {timeout_s}")
        if not 0 <= retries <= 100:
            raise ValueError(f"chip retries must be in [0, 100], got {retries}")
        self.endpoint, self.job = endpoint, job_id
        self.config = config.to_dict() if config is not None else None
        self.timeout_s, self.retries = float(timeout_s), int(retries)
        self.info: ChipInfo | None = None
        self.seq = 0
        self.dropped: dict[str, int] = {}
        self.stats = {"requests": 0, "resent": 0, "timeouts": 0, "hellos": 0}
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # A send never blocks longer than one answer may take (a chip that is down queues
        # requests in the DEALER's pipe; its high-water mark would otherwise block us for ever).
        self.sock.setsockopt(zmq.SNDTIMEO, int(self.timeout_s * 1000))
        self.handshake = cluster_keys.Handshake(self.sock, endpoint, keys)
        cluster_keys.connect(self.sock, endpoint, keys)
        self._closed = False

    # --- the three calls ----------------------------------------------------------------------
    def hello(self) -> ChipInfo:
        """Introduce the job (with its config) and learn the chip's P, samples and outputs."""
        reply = self._request(lambda seq: p.ChipHello(seq, self.job, self.config), "hello")
        self.stats["hellos"] += 1
        self.info = ChipInfo(reply.params, dict(reply.samples), reply.outputs, reply.name)
        return self.info

    def evaluate(self, theta: np.ndarray, indices: np.ndarray, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """``(cost, accuracy)``, each (S,) float64, of the runs θ (S, P) on the samples
        ``indices`` (B,) of ``split`` ("train" or "test")."""
        if split not in p.CHIP_SPLITS:
            raise ValueError(f"chip split must be one of {', '.join(p.CHIP_SPLITS)}, got {split!r}")
        theta = np.ascontiguousarray(theta, dtype="<f8")
        if theta.ndim != 2:
            raise ValueError(f"theta must be (S, P), got shape {theta.shape}")
        indices = np.ascontiguousarray(indices, dtype="<i8").reshape(-1)
        reply = self._request(lambda seq: p.ChipCost(seq, self.job, theta, indices, split), "cost",
                              runs=theta.shape[0])
        return reply.cost, reply.accuracy

    def cost(self, theta: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """C (S,) of the runs θ (S, P) on the training samples ``indices``: the output stage's
        forward pass."""
        return self.evaluate(theta, indices, "train")[0]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.handshake.close()
            self.sock.close(linger=0)

    # --- one request, with its retries ---------------------------------------------------------
    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def _fail(self, op: str, what: str, started: float) -> ChipError:
        return ChipError(f"chip {self.endpoint}: {op} for job {self.job} failed after "
                         f"{time.monotonic() - started:.1f} s: {what}")

    def _request(self, make, op: str, runs: int = 0):
        """Send ``make(seq)`` until its answer comes (see the module docstring); the reply."""
        if self._closed:
            raise ChipError(f"chip {self.endpoint}: the client of job {self.job} is closed")
        started = time.monotonic()
        self.stats["requests"] += 1
        tries = 0
        while True:
            tries += 1
            if tries > 1:
                self.stats["resent"] += 1
            self.seq += 1
            seq = self.seq
            reply = self._exchange(make(seq), op, seq, runs)
            why = self.handshake.failure()
            if why:  # a key problem does not mend itself: say so now, not after every retry
                raise self._fail(op, why, started)
            if reply is None:
                self.stats["timeouts"] += 1
                if tries > self.retries:
                    raise self._fail(op, f"no answer within {self.timeout_s:g} s to any of {tries} tries (the "
                                         f"chip is not running, not reachable, or slower than chip_timeout)",
                                     started)
                continue
            if not isinstance(reply, p.ChipErrorReply):
                return reply
            if reply.code == "bad_request" or (reply.code == "unknown_job" and op == "hello"):
                raise self._fail(op, f"the chip refused it: {reply.error} ({reply.code})", started)
            if tries > self.retries:
                raise self._fail(op, f"the chip still answers {reply.code} after {tries} tries: {reply.error}",
                                 started)
            if reply.code == "unknown_job":
                self.hello()  # the chip forgot the job (it restarted): introduce it again, then ask again

    def _exchange(self, msg, op: str, seq: int, runs: int):
        """Send one request and wait ≤ timeout for its reply; None on timeout."""
        deadline = time.monotonic() + self.timeout_s
        try:
            self.sock.send_multipart(p.encode_chip(msg), copy=False)
        except zmq.Again:  # the pipe to an absent chip is full: as good as no answer
            return None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not self.sock.poll(max(1, math.ceil(left * 1000))):
                continue  # the deadline decides, not the poll's millisecond rounding
            frames = self.sock.recv_multipart()
            try:
                reply = p.decode_chip_reply(frames)
            except p.ChipProtocolError as err:
                self._drop(err.reason)
                continue
            if reply.seq != seq:
                self._drop("stale")  # the answer to a try we gave up on
                continue
            if reply.job != self.job or (reply.OP != op and reply.OP != "error"):
                self._drop("unexpected")
                continue
            if isinstance(reply, p.ChipCostReply) and len(reply.cost) != runs:
                self._drop("unexpected")
                continue
            return reply
