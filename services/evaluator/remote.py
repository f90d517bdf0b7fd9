"""The remote evaluator hop: the broadcaster's forward pass served by another process.

With ``pmgd broadcaster --evaluator tcp://…`` the output stage sends, per forward pass, θ
of every run and the indices of the training samples on show (``CostRequest``); the cost
server (``pmgd evaluator``) runs the very same model code on its own copy of the data and
answers C per run (``CostReply``). This is the chip-in-the-loop hop of docs/architecture.md §2: its
latency becomes part of every tick, while the trajectory stays bit-identical (same code,
same numbers). The server keeps one model and data set per job, loaded on first use.

``pmgd evaluator`` also serves held-out scoring over HTTP (:mod:`.service`: ``/evaluate``,
``/health``, ``/metrics``) on ``http_host:http_port``: the cost server then runs in a
background thread and uvicorn in the main thread; SIGTERM/SIGINT stop both. With
``http_port`` 0, or when that port cannot be bound (a warning says so), it serves the cost hop
alone, as before.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import sys
import threading
from collections.abc import Callable

import numpy as np
import zmq

from pmgd_node import protocol as p
from pmgd_node.config import JobConfig
from pmgd_node.shell import keys as cluster_keys
from pmgd_node.shell.settings import parse, serve

from .data import confine, data_roots, load
from .models import job_model


class RemoteError(RuntimeError):
    """The evaluator did not answer, or answered with an error."""


class RemoteCost:
    """Broadcaster side: ``cost(theta, indices)`` over one DEALER socket, strictly in turn."""

    def __init__(self, endpoint: str, job: str, config: JobConfig, timeout_s: float = 30.0,
                 keys: cluster_keys.Keys | None = None):
        self.job, self.config = job, config.to_dict()
        self.timeout_ms = int(timeout_s * 1000)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.handshake = cluster_keys.Handshake(self.sock, endpoint, keys)
        cluster_keys.connect(self.sock, endpoint, keys)
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
        why = self.handshake.failure()
        raise RemoteError(f"evaluator {self.endpoint}: {why}" if why else
                          f"evaluator {self.endpoint} did not answer within {self.timeout_ms / 1000:g} s")

    def close(self) -> None:
        self.handshake.close()
        self.sock.close(linger=0)


@dataclasses.dataclass(frozen=True)
class EvaluatorSettings:
    """Env ``PMGD_EVALUATOR_<FIELD>`` (flags override)."""

    endpoint: str = "tcp://127.0.0.1:5560"
    device: str = ""  # torch device for the CNNs ("" = cuda if available)
    max_jobs: int = 4  # models and data sets kept loaded
    http_host: str = "127.0.0.1"  # inference service (HTTP) address
    http_port: int = 8001  # 0 = no HTTP, the cost hop alone
    data_dir: str = ""  # data sets for requests that name none; requests may name only it or data_roots
    data_roots: str = ""  # further directories requests may name, separated by os.pathsep (':')
    token: str = ""  # bearer token for POST /evaluate… over HTTP ("" = open; services/http_edge.py)
    keys: str = ""  # the cluster's key directory for the cost hop (env PMGD_KEYS too; "" = loopback only)


class CostServer:
    """ROUTER socket answering ``CostRequest`` with ``CostReply``; ``on_answer()`` is called
    after every reply sent (the HTTP service counts them into its metrics)."""

    def __init__(self, settings: EvaluatorSettings, on_answer: Callable[[], None] | None = None):
        self.s = settings
        self.on_answer = on_answer
        keys = cluster_keys.load_optional(settings.keys, cluster_keys.SERVER)
        self.ctx = zmq.Context()
        self.auth = cluster_keys.guard(self.ctx, keys)  # before the bind: no unchecked peer
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        cluster_keys.bind(self.sock, settings.endpoint, keys, "PMGD_KEYS (or --keys)")
        self.jobs: dict[str, tuple] = {}  # job → (model, train, prepared batches)
        self.roots = data_roots(settings.data_dir, settings.data_roots)
        self.dropped: dict[str, int] = {}
        self.running = True

    def _job(self, job: str, config: dict):
        entry = self.jobs.get(job)
        if entry is None:
            cfg = JobConfig.from_dict(config)
            data_dir = cfg.data_dir or self.s.data_dir
            confine(cfg.task, data_dir, self.roots)  # a job off the wire names no other directory
            model = job_model(cfg, device=self.s.device or None)
            entry = (model, load(cfg.task, data_dir, "train"), {})
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
            if self.on_answer is not None:
                self.on_answer()
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        return 0


def _bind_http(host: str, port: int) -> socket.socket | None:
    """A listening TCP socket on ``host:port``, or None (with a warning) when it cannot be bound."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        return sock
    except OSError as err:
        print(f"pmgd evaluator: WARNING: cannot bind the HTTP inference service to {host}:{port} ({err}); "
              f"serving the cost hop alone (choose another port with --http-port, 0 to disable HTTP)",
              file=sys.stderr, flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    settings = parse(EvaluatorSettings, "PMGD_EVALUATOR_", "pmgd evaluator",
                     "serve forward passes to a broadcaster (ZeroMQ) and held-out scoring over HTTP", argv)
    if settings.http_port < 0 or settings.http_port > 65535:
        raise SystemExit(f"PMGD_EVALUATOR_HTTP_PORT must be in [0, 65535] (0 = no HTTP); got {settings.http_port}")
    try:
        server = CostServer(settings)
    except cluster_keys.KeysError as err:
        raise SystemExit(f"pmgd evaluator: {err}") from None
    http = _bind_http(settings.http_host, settings.http_port) if settings.http_port else None
    if http is None:
        return serve(server)

    import uvicorn

    from .service import create_app

    try:
        app = create_app(settings)
    except ValueError as err:
        http.close()
        raise SystemExit(f"pmgd evaluator: {err}") from None
    server.on_answer = app.state.metrics.cost_answered
    web = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))

    def leave(signum, frame):
        server.running = False
        web.should_exit = True

    # uvicorn swaps in its own handlers while it serves and re-raises the signal to these after.
    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    host, port = http.getsockname()[:2]
    print(f"pmgd evaluator: inference service on http://{host}:{port} (device {app.state.device})", flush=True)
    failed = []

    def cost_loop():
        try:
            server.run()
        except BaseException as err:  # the hop is gone: take the HTTP side down too, and say why
            failed.append(err)
            print(f"pmgd evaluator: cost server failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        finally:
            web.should_exit = True

    costs = threading.Thread(target=cost_loop, name="cost-server", daemon=True)
    costs.start()
    try:
        web.run(sockets=[http])
    finally:
        server.running = False
        costs.join(timeout=5)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
