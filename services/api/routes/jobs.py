"""The job resource: ``/jobs`` and ``/jobs/{job_id}/…``. Each route hands its request to the
job controller (``services/api/jobs.py``); what it refuses comes back as a domain error that
``deps.job_error_handler`` answers with its status and ``{"detail": message}``.

Mutating requests (POST, DELETE) go through ``deps.authorize``. Every route documents the
refusals it can answer (``services/http_edge.py``: ``refusals``), so the spec holds every
status and body a client can see.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from services.http_edge import refusals

from ..jobs import Jobs
from ..schemas import EvaluateRequest, Job, JobCreate, JobLogs, JobMetrics
from ..store import STATES
from .deps import Authorized, JobsDep

router = APIRouter(tags=["jobs"])


@router.post("/jobs", status_code=201, dependencies=[Authorized], response_model=Job,
             responses=refusals(400, 401, 409, 413, 422))
def create(body: JobCreate, jobs: JobsDep) -> dict:
    return jobs.create(body.config, body.engine, angle=body.angle, start=body.start)


@router.get("/jobs", response_model=list[Job], responses=refusals(422))
def list_jobs(jobs: JobsDep,
              state: str | None = Query(None, description=f"one of {', '.join(STATES)}")) -> list[dict]:
    return jobs.list_jobs(state)


@router.get("/jobs/{job_id}", response_model=Job, responses=refusals(404))
def get_job(job_id: str, jobs: JobsDep) -> dict:
    return jobs.get(job_id)


def _action_route(action: str) -> None:
    def endpoint(job_id: str, jobs: JobsDep) -> dict:
        return jobs.act(job_id, action)

    router.post(f"/jobs/{{job_id}}/{action}", dependencies=[Authorized], name=f"{action}_job",
                summary=f"{action} the job", response_model=Job, responses=refusals(401, 404, 409, 413))(endpoint)


for _action in Jobs.ACTIONS:  # POST /jobs/{job_id}/start|pause|resume|stop
    _action_route(_action)


@router.delete("/jobs/{job_id}", status_code=204, dependencies=[Authorized], responses=refusals(401, 404, 409, 413))
def delete_job(job_id: str, jobs: JobsDep) -> Response:
    jobs.delete(job_id)
    return Response(status_code=204)


@router.get("/jobs/{job_id}/metrics", response_model=JobMetrics, responses=refusals(404))
def job_metrics(job_id: str, jobs: JobsDep,
                since: int = Query(-1, ge=-1, le=2**62, description="only points after this tick"),
                names: str = Query("", description="comma-separated series names (default: all)")) -> dict:
    return {"job": job_id, "series": jobs.series(job_id, since, {n for n in names.split(",") if n})}


@router.get("/jobs/{job_id}/logs", response_model=JobLogs, responses=refusals(404))
def job_logs(job_id: str, jobs: JobsDep, since: int = Query(0, ge=0, le=2**62)) -> dict:
    return {"job": job_id, "lines": jobs.logs(job_id, since)}


@router.get("/jobs/{job_id}/checkpoint", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}, **refusals(404)})
def checkpoint(job_id: str, jobs: JobsDep) -> Response:
    tick, npz = jobs.checkpoint(job_id)
    return Response(npz, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{job_id}-tick{tick}.npz"'})


# The evaluator's own refusals of the request (403, 404, 422) pass on; its failures are 502.
@router.post("/jobs/{job_id}/evaluate", dependencies=[Authorized],
             responses=refusals(400, 401, 403, 404, 413, 422, 502))
def evaluate(job_id: str, body: EvaluateRequest, jobs: JobsDep) -> dict:
    return jobs.evaluate(job_id, body.split, body.run, body.limit)
