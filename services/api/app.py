"""The REST API (``pmgd api``): training jobs as a resource, on FastAPI and uvicorn.

    POST   /jobs                        create (validated job config, engine local|cluster)
    GET    /jobs, /jobs/{id}            list, get
    POST   /jobs/{id}/start|pause|resume|stop
    DELETE /jobs/{id}
    GET    /jobs/{id}/metrics?since=T   time series (cost, accuracy, angle, staleness.<k>, …)
    GET    /jobs/{id}/logs?since=SEQ    the job's log lines
    GET    /jobs/{id}/checkpoint        θ⁰ as .npz
    POST   /jobs/{id}/evaluate          score the checkpoint (the evaluator service, or in-process)
    GET    /cluster                     the broadcaster's nodes and their last heartbeat
    GET    /health, /ready, /metrics    liveness, readiness, Prometheus
    GET    /dashboard                   the built-in live dashboard

Mutating requests need ``Authorization: Bearer <token>`` when a token is configured.
Jobs, metrics and checkpoints live in SQLite (``store.py``); jobs that were active when the
API stopped are ``interrupted`` after a restart and continue on ``resume``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import os
import signal
import sys
import threading
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from pmgd_node.config import JobConfig
from pmgd_node.config import json_schema as job_config_schema
from pmgd_node.shell.settings import parse
from services.cluster.client import fit_to_cluster

from .jobs import ClusterRun, LocalRun, Run
from .store import STATES, Store, UnknownJob

STATIC = os.path.join(os.path.dirname(__file__), "static")


@dataclasses.dataclass(frozen=True)
class ApiSettings:
    """Env ``PMGD_API_<FIELD>`` (flags override)."""

    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "pmgd.sqlite"
    token: str = ""  # bearer token for mutating requests ("" = open)
    broadcaster: str = ""  # control endpoint of the cluster ("" = local engine only)
    evaluator: str = ""  # base URL of the evaluator service ("" = score checkpoints in-process)
    data_dir: str = ""  # default data directory for jobs that name none
    max_local_jobs: int = 2  # local-engine jobs running at once (each takes a core)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Documented by the job config's own schema (every field, its type, range and meaning);
    # validated by JobConfig itself, the one code path every command shares (422 naming the field).
    config: Annotated[dict[str, Any], WithJsonSchema(job_config_schema())] = Field(
        description="job-config fields (see `pmgd train --help`); unset fields default")
    engine: Literal["local", "cluster"] = "local"
    start: bool = False
    angle: bool = Field(False, description="record the gradient angle (local engine only)")


class EvaluateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "test"] = "test"
    run: int = Field(0, ge=0, description="which of the job's runs (seeds) to score")
    limit: int = Field(0, ge=0, description="score only the first N samples (0 = all)")


def _config(body: JobCreate, settings: ApiSettings) -> JobConfig:
    data = dict(body.config)
    if settings.data_dir and not data.get("data_dir"):
        data["data_dir"] = settings.data_dir
    try:
        config = JobConfig.from_dict(data)
        if body.engine == "cluster" and settings.broadcaster:
            # Unset nodes: every node the cluster has (the stored config says how many).
            config = JobConfig.from_dict(fit_to_cluster(data, settings.broadcaster))
        return config
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        # ConfigError names the field; the others come from values of the wrong type.
        raise HTTPException(422, f"config: {err}") from None
    except RuntimeError as err:  # the broadcaster does not answer
        raise HTTPException(409, f"engine: {err}") from None


class Metrics:
    """The API's Prometheus series (its own registry: one app, one set)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pmgd_api_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram("pmgd_api_request_seconds", "HTTP request latency", ["route"], registry=r)
        self.jobs = Gauge("pmgd_api_jobs", "jobs by state", ["state"], registry=r)
        self.tick = Gauge("pmgd_job_tick", "perturbed ticks run", ["job"], registry=r)
        self.cost = Gauge("pmgd_job_cost", "median evaluation cost", ["job"], registry=r)
        self.accuracy = Gauge("pmgd_job_accuracy", "median evaluation accuracy", ["job"], registry=r)
        self.tps = Gauge("pmgd_job_ticks_per_second", "perturbed ticks per second", ["job"], registry=r)
        self.angle = Gauge("pmgd_job_gradient_angle_degrees", "angle of the descent step to the true gradient",
                           ["job"], registry=r)

    def job_flushed(self, job: str, latest: dict) -> None:
        for gauge, key in ((self.tick, "tick"), (self.cost, "cost"), (self.accuracy, "accuracy"),
                           (self.tps, "ticks_per_second"), (self.angle, "angle")):
            if key in latest:
                gauge.labels(job).set(latest[key])


class Jobs:
    """The store plus the threads of active jobs; every state change goes through here."""

    ACTIONS = {"start": ("created",), "pause": ("running",), "resume": ("paused", "interrupted"),
               "stop": ("running", "paused", "created", "interrupted")}

    def __init__(self, settings: ApiSettings, metrics: Metrics):
        self.s = settings
        self.store = Store(settings.db)
        self.metrics = metrics
        self.runs: dict[str, Run] = {}
        self.lock = threading.Lock()
        self.store.recover()

    def get(self, job: str) -> dict:
        try:
            return self.store.get(job)
        except UnknownJob:
            raise HTTPException(404, f"no job {job!r}") from None

    def _launch(self, job: dict) -> None:
        active = [r for r in self.runs.values() if r.is_alive()]
        if job["engine"] == "cluster":
            if not self.s.broadcaster:
                raise HTTPException(409, "engine: this API has no cluster (start it with --broadcaster ENDPOINT)")
            if any(isinstance(r, ClusterRun) for r in active):
                raise HTTPException(409, "engine: the cluster runs one job at a time and is busy")
            run: Run = ClusterRun(self.store, job, self.s.broadcaster, self.metrics.job_flushed, self.s.evaluator)
        else:
            if sum(isinstance(r, LocalRun) for r in active) >= self.s.max_local_jobs:
                raise HTTPException(409, f"engine: {self.s.max_local_jobs} local jobs are running already")
            run = LocalRun(self.store, job, self.metrics.job_flushed, self.s.evaluator)
        run.set_state("running", "started" if job["state"] == "created" else "resuming")
        self.runs[job["id"]] = run
        run.start()

    def act(self, job_id: str, action: str) -> dict:
        with self.lock:
            job = self.get(job_id)
            if job["state"] not in self.ACTIONS[action]:
                raise HTTPException(409, f"cannot {action} a job that is {job['state']} "
                                         f"(allowed from: {', '.join(self.ACTIONS[action])})")
            run = self.runs.get(job_id)
            alive = run is not None and run.is_alive()
            if action == "start" or (action == "resume" and not alive):
                self._launch(job)
            elif action == "pause":
                run.pause()
            elif action == "resume":
                run.resume()
            elif action == "stop":
                if alive:
                    run.stop()
                else:
                    self.store.set_state(job_id, "stopped")
                    self.store.log(job_id, "stopped")
        if action == "stop" and alive:
            run.join(30)
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        with self.lock:
            job = self.get(job_id)
            if job["state"] in ("running", "paused"):
                raise HTTPException(409, f"cannot delete a job that is {job['state']}: stop it first")
            self.runs.pop(job_id, None)
            self.store.delete(job_id)

    def shutdown(self) -> None:
        """The API is going down: active jobs checkpoint and become ``interrupted``."""
        runs = [r for r in self.runs.values() if r.is_alive()]
        for run in runs:
            run.stop(interrupt=True)
        for run in runs:
            run.join(30)
        self.store.close()

    def count_states(self) -> None:
        counts = dict.fromkeys(STATES, 0)
        for job in self.store.list():
            counts[job["state"]] += 1
        for state, n in counts.items():
            self.metrics.jobs.labels(state).set(n)


def _cluster_status(control: str) -> dict:
    from services.cluster.client import status

    if not control:
        return {"broadcaster": "", "reachable": False, "state": "none", "nodes": {}}
    try:
        st = status(control, timeout_s=2.0)
    except (TimeoutError, RuntimeError) as err:
        return {"broadcaster": control, "reachable": False, "state": "unreachable", "error": str(err), "nodes": {}}
    return {"broadcaster": control, "reachable": True, "state": st["state"], "job": st.get("job"),
            "pause_reason": st.get("pause_reason", ""), "dropped": st.get("dropped", {}),
            "nodes": {k: {"shard": v["shard"], "last_heartbeat_s": v["last_seen_s"], "dropped": v["dropped"]}
                      for k, v in st["nodes"].items()}}


def _score_in_process(config: JobConfig, theta: np.ndarray, req: EvaluateRequest) -> dict:
    from services.evaluator.data import load
    from services.evaluator.inference import score
    from services.evaluator.models import job_model

    model = job_model(config)
    data = load(config.task, config.data_dir, req.split)
    if req.limit:
        data = type(data)(data.x[: req.limit], data.y[: req.limit], data.num_classes, data.name)
    return score(model, theta, data)


def create_app(settings: ApiSettings) -> FastAPI:
    metrics = Metrics()
    jobs = Jobs(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        jobs.shutdown()

    app = FastAPI(title="PMGD cluster API", version="1", lifespan=lifespan,
                  description="Training jobs of parameter-multiplexed gradient descent, their metrics and checkpoints.")
    app.state.jobs = jobs

    def authorize(request: Request) -> None:
        if not settings.token:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.token}".encode()):
            raise HTTPException(401, "authorization: a valid 'Bearer <token>' header is required",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - started)
        return response

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> Response:
        try:
            jobs.store._run("SELECT 1")
        except Exception as err:  # noqa: BLE001 - any database failure means not ready
            return JSONResponse({"ready": False, "error": str(err)}, status_code=503)
        return JSONResponse({"ready": True, "broadcaster": settings.broadcaster or None})

    @app.get("/metrics")
    def prometheus() -> Response:
        jobs.count_states()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/jobs", status_code=201, dependencies=[Depends(authorize)])
    def create(body: JobCreate) -> dict:
        config = _config(body, settings)
        if body.angle and body.engine == "cluster":
            raise HTTPException(422, "angle: only the local engine records the gradient angle "
                                     "(the gradient estimate G lives on the nodes)")
        job_id = jobs.store.create(config.to_dict(), body.engine, {"angle": body.angle})
        if body.start:
            try:
                return jobs.act(job_id, "start")
            except HTTPException:
                jobs.store.delete(job_id)  # nothing half-made is left behind
                raise
        return jobs.get(job_id)

    @app.get("/jobs")
    def list_jobs(state: str | None = Query(None, description=f"one of {', '.join(STATES)}")) -> list[dict]:
        if state is not None and state not in STATES:
            raise HTTPException(422, f"state: must be one of {', '.join(STATES)}; got {state!r}")
        return [j for j in jobs.store.list() if state is None or j["state"] == state]

    @app.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return jobs.get(job_id)

    for action in Jobs.ACTIONS:
        def endpoint(job_id: str, action: str = action) -> dict:
            return jobs.act(job_id, action)

        app.post(f"/jobs/{{job_id}}/{action}", dependencies=[Depends(authorize)], name=f"{action}_job",
                 summary=f"{action} the job")(endpoint)

    @app.delete("/jobs/{job_id}", status_code=204, dependencies=[Depends(authorize)])
    def delete_job(job_id: str) -> Response:
        jobs.delete(job_id)
        return Response(status_code=204)

    @app.get("/jobs/{job_id}/metrics")
    def job_metrics(job_id: str, since: int = Query(-1, ge=-1, le=2**62, description="only points after this tick"),
                    names: str = Query("", description="comma-separated series names (default: all)")) -> dict:
        jobs.get(job_id)
        series = jobs.store.metrics(job_id, since)
        wanted = {n for n in names.split(",") if n}
        return {"job": job_id, "series": {k: v for k, v in series.items() if not wanted or k in wanted}}

    @app.get("/jobs/{job_id}/logs")
    def job_logs(job_id: str, since: int = Query(0, ge=0, le=2**62)) -> dict:
        jobs.get(job_id)
        return {"job": job_id, "lines": jobs.store.logs(job_id, since)}

    @app.get("/jobs/{job_id}/checkpoint", responses={200: {"content": {"application/octet-stream": {}}}})
    def checkpoint(job_id: str) -> Response:
        jobs.get(job_id)
        ck = jobs.store.checkpoint(job_id)
        if ck is None:
            raise HTTPException(404, f"job {job_id!r} has no checkpoint yet")
        return Response(ck[1], media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-tick{ck[0]}.npz"'})

    @app.post("/jobs/{job_id}/evaluate", dependencies=[Depends(authorize)])
    def evaluate(job_id: str, body: EvaluateRequest) -> dict:
        from services.evaluator.inference import load_checkpoint

        job = jobs.get(job_id)
        ck = jobs.store.checkpoint(job_id)
        if ck is None:
            raise HTTPException(404, f"job {job_id!r} has no checkpoint yet")
        config = JobConfig.from_dict(job["config"])
        if settings.evaluator:
            return _remote_score(settings.evaluator, config, ck[1], body)
        try:
            theta, _ = load_checkpoint(ck[1], body.run)
            report = _score_in_process(config, theta, body)
        except (RuntimeError, ValueError) as err:  # a run the job lacks, a missing data set
            raise HTTPException(422, str(err)) from None
        return dict(report, job=job_id, tick=ck[0], split=body.split)

    @app.get("/cluster")
    def cluster() -> dict:
        return _cluster_status(settings.broadcaster)

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse("/dashboard")

    @app.get("/dashboard", include_in_schema=False)
    def dashboard() -> Response:
        return FileResponse(os.path.join(STATIC, "dashboard.html"))

    if os.path.isdir(STATIC):
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _remote_score(base: str, config: JobConfig, npz: bytes, req: EvaluateRequest) -> dict:
    import httpx

    params = {"task": config.task, "network": config.network, "split": req.split, "run": req.run,
              "limit": req.limit, "data_dir": config.data_dir or ""}
    try:
        r = httpx.post(base.rstrip("/") + "/evaluate/checkpoint", params=params, content=npz, timeout=600,
                       headers={"content-type": "application/octet-stream"})
    except httpx.HTTPError as err:
        raise HTTPException(502, f"evaluator {base}: {err}") from None
    if r.status_code >= 400:
        is_json = r.headers.get("content-type", "").startswith("application/json")
        detail = r.json().get("detail", r.text) if is_json else r.text
        raise HTTPException(r.status_code if r.status_code < 500 else 502, f"evaluator: {detail}")
    return r.json()


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    settings = parse(ApiSettings, "PMGD_API_", "pmgd api", "serve the PMGD REST API and dashboard", argv)
    app = create_app(settings)
    print(f"pmgd api: http://{settings.host}:{settings.port} (db {settings.db}, "
          f"cluster {settings.broadcaster or 'none'}, token {'set' if settings.token else 'none'})", flush=True)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT (jobs checkpoint, see Jobs.shutdown) and
    # then re-raises the signal to the handler it found: make that one return, so we exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
