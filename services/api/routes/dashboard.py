"""The built-in live dashboard: ``/`` redirects to ``/dashboard``, its page; ``/static/…`` serves
its script and styles from ``services/api/static/``."""

from __future__ import annotations

import os

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "static")

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> Response:
    return RedirectResponse("/dashboard")


@router.get("/dashboard")
def dashboard() -> Response:
    return FileResponse(os.path.join(STATIC, "dashboard.html"))


if os.path.isdir(STATIC):
    router.mount("/static", StaticFiles(directory=STATIC), name="static")
