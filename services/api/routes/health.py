"""Liveness, readiness and the API's Prometheus series."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..schemas import Health, Ready
from .deps import JobsDep, MetricsDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", responses={200: {"model": Ready}, 503: {"model": Ready, "description": "not ready"}})
def ready(jobs: JobsDep, settings: SettingsDep) -> Response:
    try:
        jobs.ping()
    except Exception as err:  # noqa: BLE001 - any database failure means not ready
        return JSONResponse({"ready": False, "error": str(err)}, status_code=503)
    return JSONResponse({"ready": True, "broadcaster": settings.broadcaster or None})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def prometheus(jobs: JobsDep, metrics: MetricsDep) -> Response:
    jobs.count_states()
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
