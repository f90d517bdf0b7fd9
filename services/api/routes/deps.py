"""What the routers share: the app's state (settings, job controller, Prometheus series) as
dependencies, the bearer-token check of mutating requests, and the HTTP status of each
domain error the controller raises (``services/api/errors.py``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from services.http_edge import AUTH_DETAIL, bearer_ok

from ..errors import EvaluatorFailed, InvalidJob, JobConflict, JobError, JobNotFound
from ..jobs import Jobs
from ..settings import ApiSettings
from ..telemetry import Metrics


def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def get_jobs(request: Request) -> Jobs:
    return request.app.state.jobs


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
JobsDep = Annotated[Jobs, Depends(get_jobs)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def authorize(request: Request, settings: SettingsDep) -> None:
    """With a token configured, a mutating request must carry ``Authorization: Bearer <token>``
    (compared in constant time); reads stay open."""
    if not bearer_ok(request.headers.get("authorization", "").encode(), settings.token):
        raise HTTPException(401, AUTH_DETAIL, headers={"WWW-Authenticate": "Bearer"})


Authorized = Depends(authorize)

# Domain error → HTTP status; EvaluatorFailed passes the evaluator's own 4xx on (see http_status).
STATUS: tuple[tuple[type[JobError], int], ...] = ((JobNotFound, 404), (JobConflict, 409), (InvalidJob, 422))


def http_status(err: JobError) -> int:
    if isinstance(err, EvaluatorFailed):  # its refusal is the client's to fix; its failure is a bad gateway
        return err.status if err.status is not None and 400 <= err.status < 500 else 502
    return next((status for cls, status in STATUS if isinstance(err, cls)), 500)


async def job_error_handler(request: Request, err: JobError) -> JSONResponse:
    """The controller's refusal as FastAPI answers an HTTPException: ``{"detail": message}``."""
    return JSONResponse({"detail": str(err)}, status_code=http_status(err))
