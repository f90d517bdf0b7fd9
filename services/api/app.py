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
import hmac
import os
import signal
import sys
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from pmgd_node.config import json_schema as job_config_schema
from pmgd_node.shell.settings import parse

from .errors import EvaluatorFailed, InvalidJob, JobConflict, JobError, JobNotFound
from .jobs import Jobs
from .settings import ApiSettings
from .store import STATES
from .telemetry import Metrics

STATIC = os.path.join(os.path.dirname(__file__), "static")


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


def http_status(err: JobError) -> int:
    if isinstance(err, EvaluatorFailed):  # the evaluator's refusal passed on; its failure is ours to report
        return err.status if err.status is not None and 400 <= err.status < 500 else 502
    for cls, status in ((JobNotFound, 404), (JobConflict, 409), (InvalidJob, 422)):
        if isinstance(err, cls):
            return status
    return 500


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

    app.middleware("http")(metrics.counting())

    @app.exception_handler(JobError)
    async def refused(request: Request, err: JobError) -> Response:
        return JSONResponse({"detail": str(err)}, status_code=http_status(err))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> Response:
        try:
            jobs.ping()
        except Exception as err:  # noqa: BLE001 - any database failure means not ready
            return JSONResponse({"ready": False, "error": str(err)}, status_code=503)
        return JSONResponse({"ready": True, "broadcaster": settings.broadcaster or None})

    @app.get("/metrics")
    def prometheus() -> Response:
        jobs.count_states()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/jobs", status_code=201, dependencies=[Depends(authorize)])
    def create(body: JobCreate) -> dict:
        return jobs.create(body.config, body.engine, angle=body.angle, start=body.start)

    @app.get("/jobs")
    def list_jobs(state: str | None = Query(None, description=f"one of {', '.join(STATES)}")) -> list[dict]:
        return jobs.list_jobs(state)

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
        return {"job": job_id, "series": jobs.series(job_id, since, {n for n in names.split(",") if n})}

    @app.get("/jobs/{job_id}/logs")
    def job_logs(job_id: str, since: int = Query(0, ge=0, le=2**62)) -> dict:
        return {"job": job_id, "lines": jobs.logs(job_id, since)}

    @app.get("/jobs/{job_id}/checkpoint", responses={200: {"content": {"application/octet-stream": {}}}})
    def checkpoint(job_id: str) -> Response:
        ck = jobs.checkpoint(job_id)
        return Response(ck[1], media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-tick{ck[0]}.npz"'})

    @app.post("/jobs/{job_id}/evaluate", dependencies=[Depends(authorize)])
    def evaluate(job_id: str, body: EvaluateRequest) -> dict:
        return jobs.evaluate(job_id, body.split, body.run, body.limit)

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
