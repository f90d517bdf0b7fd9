"""The API's routers, one per resource, assembled by ``services.api.app.create_app``:

    health.py      GET /health, /ready, /metrics   liveness, readiness, Prometheus
    jobs.py        /jobs…                          the job resource (controller: ``services/api/jobs.py``)
    cluster.py     GET /cluster                    the broadcaster's state and nodes
    dashboard.py   GET /, /dashboard, /static/…    the built-in live dashboard

``deps.py`` holds what they share: the state accessors, the bearer-token check and the
mapping of the controller's errors to HTTP statuses.
"""

from . import cluster, dashboard, health, jobs

ROUTERS = (health.router, jobs.router, cluster.router, dashboard.router)  # in the order the spec lists them
