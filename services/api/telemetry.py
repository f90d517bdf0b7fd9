"""The API's own Prometheus series (served on ``GET /metrics``) and the middleware that counts
every HTTP request into them."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request


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

    def counting(self):
        """An HTTP middleware (``app.middleware("http")``): requests by method, route template
        and status, and their latency by route ("unmatched" for a path no route serves)."""

        async def count(request: Request, call_next):
            started = time.perf_counter()
            response = await call_next(request)
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.requests.labels(request.method, path, str(response.status_code)).inc()
            self.latency.labels(path).observe(time.perf_counter() - started)
            return response

        return count
