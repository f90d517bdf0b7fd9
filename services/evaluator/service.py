"""The evaluator's HTTP face: held-out scoring of one θ as an inference service (FastAPI).

Endpoints of :func:`create_app`:

* ``GET /health`` → ``{"status": "ok", "device", "torch", "cuda"}``; ``device`` is where the
  service evaluates (``settings.device``, else ``cuda:0`` when torch sees a GPU, else ``cpu``;
  the numpy parity MLPs always run on ``cpu`` and report so per request).
* ``POST /evaluate`` with a JSON body (:class:`EvaluateRequest`) holding exactly one of
  ``theta`` (P floats) or ``checkpoint`` (base64 of a job-store .npz, run ``run``).
* ``POST /evaluate/checkpoint?task=…&split=…&network=…&data_dir=…&run=0&limit=0`` with the
  raw .npz as the request body (``application/octet-stream``).

Both answer :func:`.inference.score`'s dict plus ``task``, ``network`` (resolved: "2-2-1",
"cnn-cifar10"), ``split``, ``num_params``, ``run`` and ``tick`` (the checkpoint's; None for a
bare θ). Bad input is a 4xx naming the field, never a 5xx: 422 ``{"detail": "<field>: …",
"field": "<field>"}`` for a bad value (FastAPI's own 422 list for a malformed body), 404 with
the loader's message when the data set is missing or unreadable (field ``data_dir``).

* ``GET /metrics``: Prometheus text of the app's own registry (names in :class:`Metrics`).

With ``settings.token`` set, the POSTs need ``Authorization: Bearer <token>``: 401 before any
of the body is read, as the API does (:class:`services.http_edge.Guard`); ``/health`` and
``/metrics`` stay open for health checks and Prometheus. Bodies are capped at
:data:`MAX_BODY` (413). Every refusal is documented in ``/openapi.json``.

Models and data splits are built on first use and kept in a small LRU keyed by
(task, network, split, data_dir) of ``settings.max_jobs`` entries. ``init_scale`` is
validated like a job's but cannot change a score (it only scales a fresh initialisation).
"""

from __future__ import annotations

import base64
import binascii
import collections
import math
import threading

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict

from pmgd_node.config import MAX_JOB_VALUES, ConfigError, JobConfig
from services.http_edge import Guard, refusals

from .data import Dataset, DatasetError, OutsideRoots, confine, data_roots, load
from .inference import InvalidInput, load_checkpoint, score
from .models import Model, build_model

SPLITS = ("test", "train")
ENDPOINTS = ("/health", "/evaluate", "/evaluate/checkpoint", "/metrics")
# The largest body is a local job's checkpoint as the API stores and sends it: θ⁰ and the
# gradient state, float64, at most MAX_JOB_VALUES values each; base64 in /evaluate adds a third.
MAX_BODY = 2 * MAX_JOB_VALUES * 8 * 4 // 3 + (1 << 20)
# What /evaluate… may refuse: a body that is not text, the token, the body's size, a directory
# outside the roots, data missing or unreadable, a bad value (422 {"detail", "field"}, or FastAPI's list).
REFUSALS = refusals(400, 401, 403, 404, 413, 422)


class EvaluateRequest(BaseModel):
    """Body of ``POST /evaluate``; unknown fields are refused (a typo names itself)."""

    model_config = ConfigDict(extra="forbid")

    task: str
    network: str = ""  # "" → the task's reference network
    split: str = "test"
    data_dir: str = ""  # "" → settings.data_dir
    theta: list[float] | None = None
    checkpoint: str | None = None  # base64 of the .npz
    run: int = 0
    limit: int = 0  # only the first N samples; 0 = all
    init_scale: float = 1.0


class Metrics:
    """The service's Prometheus series, in one registry per app (so tests and apps never share).

    ``pmgd_evaluator_requests_total{endpoint,status}``, ``pmgd_evaluator_images_total``,
    ``pmgd_evaluator_images_per_second`` (last scoring), ``pmgd_evaluator_eval_seconds``
    (histogram of :func:`.inference.score`'s forward-pass seconds),
    ``pmgd_evaluator_cost_requests_total`` (ZeroMQ cost requests the CostServer answered; call
    :meth:`cost_answered`), ``pmgd_evaluator_device_info{device}`` = 1.
    """

    def __init__(self, device: str):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pmgd_evaluator_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.images = Counter("pmgd_evaluator_images_total", "samples scored", registry=r)
        self.images_per_second = Gauge("pmgd_evaluator_images_per_second", "throughput of the last scoring",
                                       registry=r)
        self.eval_seconds = Histogram("pmgd_evaluator_eval_seconds", "forward-pass seconds per scoring",
                                      buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
                                      registry=r)
        self.cost_requests = Counter("pmgd_evaluator_cost_requests_total",
                                     "ZeroMQ cost requests answered by the cost server", registry=r)
        self.device_info = Gauge("pmgd_evaluator_device_info", "device the service evaluates on", ["device"],
                                 registry=r)
        self.device_info.labels(device=device).set(1)

    def cost_answered(self) -> None:
        self.cost_requests.inc()

    def scored(self, result: dict) -> None:
        self.images.inc(result["samples"])
        self.images_per_second.set(result["images_per_second"])
        self.eval_seconds.observe(result["seconds"])


def resolve_device(setting: str) -> str:
    """``setting`` (a torch device string) or ``cuda:0`` when a GPU is visible, else ``cpu``.

    An explicit CUDA device without CUDA, or an unknown device, fails fast naming the setting."""
    import torch

    try:
        dev = torch.device(setting or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"evaluator setting 'device': {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"evaluator setting 'device': {setting!r} but torch sees no CUDA device")
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    return str(dev)


class _Rejected(Exception):
    def __init__(self, status: int, field: str, message: str):
        self.status, self.field, self.message = status, field, message


class _Cache:
    """LRU of (model, data split) keyed by (task, network, split, data_dir)."""

    def __init__(self, size: int, device: str):
        self.size, self.device = max(1, size), device
        self.entries: collections.OrderedDict[tuple, tuple[Model, Dataset]] = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, task: str, network: str, split: str, data_dir: str, init_scale: float) -> tuple[Model, Dataset]:
        key = (task, network, split, data_dir)
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                try:
                    model = build_model(task, network, device=self.device, init_scale=init_scale)
                except ValueError as err:  # a spec the job config lets through but the model zoo refuses
                    raise _Rejected(422, "network", f"network: {err}") from None
                entry = (model, load(task, data_dir or None, split))
                self.entries[key] = entry
                while len(self.entries) > self.size:
                    self.entries.popitem(last=False)
            self.entries.move_to_end(key)
            return entry


def _json_safe(value):
    """NaN/±inf (a diverged θ's loss) → None: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _job_config(task: str, network: str, data_dir: str, init_scale: float) -> JobConfig:
    try:
        return JobConfig(task=task, network=network, data_dir=data_dir, init_scale=init_scale)
    except ConfigError as err:
        raise _Rejected(422, err.field, str(err)) from None
    except TypeError as err:  # a non-string task or network
        raise _Rejected(422, "task", str(err)) from None


def create_app(settings) -> FastAPI:
    """The inference service for ``settings`` (an ``EvaluatorSettings``: device, data_dir, data_roots,
    max_jobs, token).

    ``app.state.metrics`` is the :class:`Metrics` object; ``app.state.device`` the resolved device."""
    import torch

    device = resolve_device(settings.device)
    metrics = Metrics(device)
    cache = _Cache(settings.max_jobs, device)
    roots = data_roots(settings.data_dir, settings.data_roots)
    app = FastAPI(title="pmgd evaluator", description="held-out scoring of PMGD parameter vectors")
    app.state.metrics, app.state.device = metrics, device

    @app.middleware("http")
    async def count(request: Request, call_next):
        try:
            response = await call_next(request)
            status = response.status_code
        except Exception:
            status = 500
            raise
        finally:
            path = request.url.path
            metrics.requests.labels(endpoint=path if path in ENDPOINTS else "other", status=str(status)).inc()
        return response

    @app.exception_handler(_Rejected)
    async def rejected(request: Request, err: _Rejected):
        return JSONResponse({"detail": err.message, "field": err.field}, status_code=err.status)

    def evaluate(task: str, network: str, split: str, data_dir: str, run: int, limit: int, init_scale: float,
                 theta=None, npz: bytes | None = None) -> dict:
        cfg = _job_config(task, network, data_dir or settings.data_dir, init_scale)
        if split not in SPLITS:
            raise _Rejected(422, "split", f"split: must be one of {', '.join(SPLITS)}; got {split!r}")
        if isinstance(limit, bool) or limit < 0:
            raise _Rejected(422, "limit", f"limit: must be an integer ≥ 0 (0 = the whole split); got {limit!r}")
        if isinstance(run, bool) or run < 0:
            raise _Rejected(422, "run", f"run: must be an integer ≥ 0; got {run!r}")
        try:
            tick = None
            if npz is not None:
                theta, tick = load_checkpoint(npz, run)
            confine(cfg.task, cfg.data_dir, roots)
            model, data = cache.get(cfg.task, cfg.network, split, cfg.data_dir, init_scale)
            if limit:
                data = Dataset(data.x[:limit], data.y[:limit], data.num_classes, data.name)
            result = score(model, np.asarray(theta, dtype=np.float64), data)
        except InvalidInput as err:
            raise _Rejected(422, err.field, str(err)) from None
        except OutsideRoots as err:
            raise _Rejected(403, "data_dir", f"data_dir: {err}") from None
        except DatasetError as err:
            raise _Rejected(404, "data_dir", f"data_dir: {err}") from None
        except OSError as err:  # a name too long, a directory not readable, …: the client's path
            reason = err.strerror or type(err).__name__
            raise _Rejected(404, "data_dir", f"data_dir: cannot read it ({reason})") from None
        metrics.scored(result)
        out = {k: _json_safe(v) for k, v in result.items()}
        out.update(task=cfg.task, network=cfg.network, split=split, num_params=model.num_params, run=run, tick=tick)
        return out

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "device": device, "torch": torch.__version__, "cuda": torch.cuda.is_available()}

    @app.post("/evaluate", responses=REFUSALS)
    def evaluate_json(body: EvaluateRequest) -> dict:
        if (body.theta is None) == (body.checkpoint is None):
            raise _Rejected(422, "theta", "theta/checkpoint: give exactly one of 'theta' (a list of P numbers) "
                                          "or 'checkpoint' (base64 of an .npz)")
        npz = None
        if body.checkpoint is not None:
            try:
                npz = base64.b64decode(body.checkpoint, validate=True)
            except (binascii.Error, ValueError) as err:
                raise _Rejected(422, "checkpoint", f"checkpoint: not base64 ({err})") from None
        return evaluate(body.task, body.network, body.split, body.data_dir, body.run, body.limit, body.init_scale,
                        theta=body.theta, npz=npz)

    # The body is the raw .npz, read by hand: the spec says so itself.
    @app.post("/evaluate/checkpoint", responses=REFUSALS, openapi_extra={"requestBody": {
        "required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def evaluate_checkpoint(request: Request, task: str = Query(...), split: str = "test", network: str = "",
                                  data_dir: str = "", run: int = 0, limit: int = 0, init_scale: float = 1.0) -> dict:
        npz = await request.body()
        return await run_in_threadpool(evaluate, task, network, split, data_dir, run, limit, init_scale, npz=npz)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Guard, token=settings.token, max_body=MAX_BODY)  # outermost: before any body is read
    return app
