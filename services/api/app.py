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

This module only assembles the app: one router per resource (``routes/``), the models they
take and return (``schemas.py``), the job controller and its runs (``jobs.py``), the domain
errors it raises (``errors.py``, mapped to HTTP in ``routes/deps.py``), the scoring paths
(``scoring.py``), the Prometheus series (``telemetry.py``) and the settings read at the edge
(``settings.py``, ``ApiSettings``).
"""

from __future__ import annotations

import contextlib
import signal
import sys

from fastapi import FastAPI

from pmgd_node.shell.keys import KeysError
from pmgd_node.shell.settings import parse
from services.http_edge import Guard

from .errors import JobError
from .jobs import Jobs
from .routes import ROUTERS
from .routes.deps import job_error_handler
from .settings import ApiSettings
from .telemetry import Metrics

__all__ = ["ApiSettings", "create_app", "main"]


def create_app(settings: ApiSettings) -> FastAPI:
    """The app for ``settings``: its state (``settings``, ``metrics``, ``jobs``: the controller,
    which opens the store and recovers interrupted jobs), the request-counting middleware, the
    answer to the controller's errors and the routers. Shutting down checkpoints active jobs."""
    metrics = Metrics()
    jobs = Jobs(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        jobs.shutdown()

    app = FastAPI(title="PMGD cluster API", version="1", lifespan=lifespan,
                  description="Training jobs of parameter-multiplexed gradient descent, their metrics and checkpoints.")
    app.state.settings, app.state.metrics, app.state.jobs = settings, metrics, jobs
    app.middleware("http")(metrics.counting())
    app.add_exception_handler(JobError, job_error_handler)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(Guard, token=settings.token)  # outermost: before any body is read
    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    settings = parse(ApiSettings, "PMGD_API_", "pmgd api", "serve the PMGD REST API and dashboard", argv)
    try:
        app = create_app(settings)
    except KeysError as err:
        raise SystemExit(f"pmgd api: {err}") from None
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
