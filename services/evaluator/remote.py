"""The remote evaluator hop: a job's forward passes served by ``pmgd evaluator`` as a chip.

``pmgd evaluator`` speaks the chip protocol (docs/chip-protocol.md, ``pmgd_node/protocol.py``):
it is one chip that serves many jobs, each introduced by a hello carrying the job's config.
A broadcaster started with ``--evaluator tcp://…`` (or a job whose ``chip`` names the evaluator)
talks to it through :class:`services.chip.client.ChipClient`: per tick θ of every run and the
indices of the training samples on show go out, C (and accuracy) per run come back, and every
evaluation of θ⁰ runs here too, on the job's evaluation split. The server runs the very same
model code on its own copy of the data, so the trajectory stays bit-identical to the
in-process one (same code, same numbers); the hop's latency becomes part of every tick. It
keeps one model and data set per job (``max_jobs``), loaded at the job's hello; a request for
a job it does not hold (it restarted) is answered ``unknown_job``, and the trainer says hello
again. Bad requests are answered with an error, never fatal; malformed frames are dropped and
counted (``dropped``).

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
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import zmq

from pmgd_node import protocol as p
from pmgd_node.config import JobConfig
from pmgd_node.shell import keys as cluster_keys
from pmgd_node.shell.settings import parse, serve

from .data import Dataset, confine, data_roots, load
from .models import Model, job_model


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


@dataclasses.dataclass
class _Job:
    """What the server holds for one job: its model, its splits and prepared batches."""

    config: JobConfig
    model: Model
    splits: dict  # "train"/"test" → Dataset (test None when it cannot be loaded: see test_error)
    test_error: str = ""
    outputs: int = 0
    prepared: dict = dataclasses.field(default_factory=dict)  # (split, indices bytes) → Batch


def _split(cfg: JobConfig, data_dir: str, split: str) -> Dataset:
    if cfg.task == "custom":  # the user's own network brings its own data (services/evaluator/user_model.py)
        from .user_model import user_data

        return user_data(cfg, split)
    return load(cfg.task, data_dir, split)


def _outputs_per_sample(model: Model, x: np.ndarray) -> int:
    """O of the model, from one forward pass on one sample (0 when the model cannot say)."""
    forward = getattr(model, "forward", None)
    try:
        out = np.asarray(forward(np.zeros((1, model.num_params), dtype=model.dtype), x[:1]))
        return int(out.shape[-1])
    except Exception:  # a model without outputs to show: the hello says 0
        return 0


class CostServer:
    """A ROUTER socket answering the chip protocol for any number of jobs (see the module
    docstring); ``on_answer()`` is called after every reply to a cost request (the HTTP service
    counts them into its metrics)."""

    def __init__(self, settings: EvaluatorSettings, on_answer: Callable[[], None] | None = None):
        self.s = settings
        self.on_answer = on_answer
        keys = cluster_keys.load_optional(settings.keys, cluster_keys.SERVER)
        self.ctx = zmq.Context()
        self.auth = cluster_keys.guard(self.ctx, keys)  # before the bind: no unchecked peer
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        cluster_keys.bind(self.sock, settings.endpoint, keys, "PMGD_KEYS (or --keys)")
        self.jobs: OrderedDict[str, _Job] = OrderedDict()
        self.roots = data_roots(settings.data_dir, settings.data_roots)
        self.dropped: dict[str, int] = {}
        self.running = True

    def _load(self, cfg: JobConfig) -> _Job:
        data_dir = cfg.data_dir or self.s.data_dir
        confine(cfg.task, data_dir, self.roots)  # a job off the wire names no other directory
        model = job_model(cfg, device=self.s.device or None)
        train = _split(cfg, data_dir, "train")
        test, test_error = None, ""
        try:
            test = _split(cfg, data_dir, "test")
        except (OSError, ValueError, RuntimeError) as err:  # training alone still works without it
            test_error = f"{type(err).__name__}: {err}"
        return _Job(cfg, model, {"train": train, "test": test}, test_error, _outputs_per_sample(model, train.x))

    def _hello(self, msg: p.ChipHello) -> p.ChipInfo:
        job = self.jobs.get(msg.job)
        cfg = None if msg.config is None else JobConfig.from_dict(msg.config)
        if cfg is not None and (job is None or job.config != cfg):  # a new job, or new under an old id
            job = self._load(cfg)
            self.jobs.pop(msg.job, None)
            while len(self.jobs) >= max(1, self.s.max_jobs):
                self.jobs.popitem(last=False)  # the job introduced longest ago
            self.jobs[msg.job] = job
        if job is None:
            raise ValueError(f"job {msg.job!r} is new here: its hello must carry the job's config "
                             "(the evaluator loads the job's model and data from it)")
        samples = {name: 0 if d is None else len(d) for name, d in job.splits.items()}
        return p.ChipInfo(msg.seq, msg.job, job.model.num_params, samples, job.outputs,
                          f"pmgd evaluator: {job.model.name}")

    def _cost(self, msg: p.ChipCost, job: _Job) -> p.ChipCostReply:
        data = job.splits[msg.split]
        if data is None:
            raise ValueError(f"the {msg.split} split of job {msg.job!r} is not available here: {job.test_error}")
        P = job.model.num_params
        if msg.theta.shape[1] != P:
            raise ValueError(f"theta has {msg.theta.shape[1]} parameters per run; the network of job "
                             f"{msg.job!r} has {P}")
        idx = msg.indices
        if idx.max() >= len(data):
            raise ValueError(f"indices must lie in [0, {len(data)}) for the {msg.split} split; got {int(idx.max())}")
        key = (msg.split, idx.tobytes())
        batch = job.prepared.get(key)
        if batch is None:
            if len(job.prepared) > 256:
                job.prepared.clear()
            batch = job.prepared[key] = job.model.prepare(data.x[idx], data.y[idx])
        cost, accuracy = job.model.evaluate(msg.theta, batch)
        outputs = None
        if msg.outputs:
            forward = getattr(job.model, "forward", None)
            if forward is None:
                raise ValueError(f"the network of job {msg.job!r} gives no outputs")
            outputs = np.asarray(forward(msg.theta, data.x[idx]), dtype=np.float64)
            outputs = outputs.reshape(len(msg.theta), len(idx), -1)
        return p.ChipCostReply(msg.seq, msg.job, np.asarray(cost, dtype=np.float64),
                               np.asarray(accuracy, dtype=np.float64), outputs)

    def answer(self, msg: p.ChipHello | p.ChipCost) -> p.ChipInfo | p.ChipCostReply | p.ChipErrorReply:
        """The reply to one decoded request: a hello's info, a cost reply, or an error."""
        try:
            if isinstance(msg, p.ChipHello):
                return self._hello(msg)
            job = self.jobs.get(msg.job)
            if job is None:
                return p.ChipErrorReply(msg.seq, msg.job, f"job {msg.job!r} is unknown here (the evaluator "
                                        "restarted, or dropped it for newer jobs): say hello again", "unknown_job")
            return self._cost(msg, job)
        except Exception as err:  # anything off the wire: answer it, never die of it
            return p.ChipErrorReply(msg.seq, msg.job, f"{type(err).__name__}: {err}"[: p.CHIP_MAX_TEXT])

    def run(self) -> int:
        print(f"pmgd evaluator: cost server (chip protocol v{p.CHIP_VERSION}) on {self.s.endpoint}", flush=True)
        while self.running:
            if not self.sock.poll(200):
                continue
            frames = self.sock.recv_multipart()
            try:
                msg = p.decode_chip_request(frames[1:])
            except p.ChipProtocolError as err:
                self.dropped[err.reason] = self.dropped.get(err.reason, 0) + 1
                continue
            self.sock.send_multipart([frames[0]] + p.encode_chip(self.answer(msg)), copy=False)
            if self.on_answer is not None and isinstance(msg, p.ChipCost):
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
