"""The remote evaluator hop: the broadcaster's forward pass served by another process.

With ``pmgd broadcaster --evaluator tcp://…`` the output stage sends, per forward pass, θ
of every run and the indices of the training samples on show (``CostRequest``); the cost
server (``pmgd evaluator``) runs the very same model code on its own copy of the data and
answers C per run (``CostReply``). This is the chip-in-the-loop hop of DESIGN §2: its
latency becomes part of every tick, while the trajectory stays bit-identical (same code,
same numbers). The server keeps one model and data set per job, loaded on first use.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import zmq

from pmgd_node import protocol as p
from pmgd_node.config import JobConfig
from pmgd_node.settings import parse, serve

from .data import load
from .models import build_model


class RemoteError(RuntimeError):
    """The evaluator did not answer, or answered with an error."""


class RemoteCost:
    """Broadcaster side: ``cost(theta, indices)`` over one DEALER socket, strictly in turn."""

    def __init__(self, endpoint: str, job: str, config: JobConfig, timeout_s: float = 30.0):
        self.job, self.config = job, config.to_dict()
        self.timeout_ms = int(timeout_s * 1000)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self.seq = 0

    def cost(self, theta: np.ndarray, indices: np.ndarray) -> np.ndarray:
        self.seq += 1
        self.sock.send_multipart(p.encode(p.CostRequest(self.job, self.seq, self.config, theta, indices)))
        while self.sock.poll(self.timeout_ms):
            try:
                reply = p.decode(self.sock.recv_multipart())
            except p.ProtocolError:
                continue
            if not isinstance(reply, p.CostReply) or reply.seq != self.seq:
                continue  # a late answer to a request we gave up on
            if reply.error or reply.cost is None:
                raise RemoteError(f"evaluator {self.endpoint}: {reply.error or 'no cost'}")
            return reply.cost
        raise RemoteError(f"evaluator {self.endpoint} did not answer within {self.timeout_ms / 1000:g} s")

    def close(self) -> None:
        self.sock.close(linger=0)


@dataclasses.dataclass(frozen=True)
class EvaluatorSettings:
    """Env ``PMGD_EVALUATOR_<FIELD>`` (flags override)."""

    endpoint: str = "tcp://127.0.0.1:5560"
    device: str = ""  # torch device for the CNNs ("" = cuda if available)
    max_jobs: int = 4  # models and data sets kept loaded


class CostServer:
    def __init__(self, settings: EvaluatorSettings):
        self.s = settings
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(settings.endpoint)
        self.jobs: dict[str, tuple] = {}  # job → (model, train, prepared batches)
        self.dropped: dict[str, int] = {}
        self.running = True

    def _job(self, job: str, config: dict):
        entry = self.jobs.get(job)
        if entry is None:
            cfg = JobConfig.from_dict(config)
            model = build_model(cfg.task, cfg.network, device=self.s.device or None, init_scale=cfg.init_scale)
            entry = (model, load(cfg.task, cfg.data_dir, "train"), {})
            if len(self.jobs) >= self.s.max_jobs:
                self.jobs.pop(next(iter(self.jobs)))
            self.jobs[job] = entry
        return entry

    def answer(self, req: p.CostRequest) -> p.CostReply:
        try:
            model, train, prepared = self._job(req.job, req.config)
            idx = np.asarray(req.indices, dtype=np.int64)
            if idx.ndim != 1 or not len(idx) or idx.min() < 0 or idx.max() >= len(train.y):
                raise ValueError(f"indices must be a non-empty list in [0, {len(train.y)})")
            key = idx.tobytes()
            batch = prepared.get(key)
            if batch is None:
                if len(prepared) > 256:
                    prepared.clear()
                batch = prepared[key] = model.prepare(train.x[idx], train.y[idx])
            cost = np.asarray(model.cost(req.theta, batch), dtype=np.float64)
            return p.CostReply(req.job, req.seq, cost)
        except Exception as err:  # anything off the wire: answer it, never die of it
            return p.CostReply(req.job, req.seq, None, f"{type(err).__name__}: {err}")

    def run(self) -> int:
        print(f"pmgd evaluator: cost server on {self.s.endpoint}", flush=True)
        while self.running:
            if not self.sock.poll(200):
                continue
            frames = self.sock.recv_multipart()
            try:
                msg = p.decode(frames[1:])
            except p.ProtocolError as err:
                self.dropped[err.reason] = self.dropped.get(err.reason, 0) + 1
                continue
            if not isinstance(msg, p.CostRequest):
                self.dropped["unexpected"] = self.dropped.get("unexpected", 0) + 1
                continue
            self.sock.send_multipart([frames[0]] + p.encode(self.answer(msg)), copy=False)
        self.sock.close(linger=0)
        self.ctx.term()
        return 0


def main(argv: list[str] | None = None) -> int:
    settings = parse(EvaluatorSettings, "PMGD_EVALUATOR_", "pmgd evaluator", "serve forward passes to a broadcaster",
                     argv)
    return serve(CostServer(settings))


if __name__ == "__main__":
    sys.exit(main())
