"""Where a study's points run: in this process, in local worker processes, or on a Dask cluster.

The runner (``sweep.run_study``) hands an executor the points still to run and writes what
comes back; an executor only computes. Every executor yields, for each point it was handed,
the point's entry ``{"key", "rows", "wall_s"}`` (``sweep.point_entry``) as the point finishes,
in whatever order points finish: the runner puts them in the points' order itself.

* :class:`InProcess` (``--workers 1``): one point after another with one ``Context``, as
  ``pmgd study`` always ran; an exception in a point propagates unchanged.
* :class:`LocalWorkers` (``--workers N``): N worker processes on this machine, each with
  ``cores // N`` threads, its own ``Context`` (so ``--engine cluster`` starts one cluster per
  worker) and its own port block (``workers.WorkerPool``).
* ``dask_executor.DaskExecutor`` (``--scheduler ADDRESS|local``): a Dask distributed cluster.

A point's computation is deterministic given its config and never depends on which worker
runs it, so the files a study writes are the same whatever the executor.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

from .sweep import Context, Point, Study, point_entry, run_point


def label(point: Point) -> str:
    """A point as the progress bar and errors name it: ``delay=2, perturbation=fm``."""
    return ", ".join(f"{k}={v}" for k, v in point.key.items()) or "the point"


class Executor(ABC):
    """Runs a study's points; :meth:`run` yields each point's entry as it finishes."""

    workers = 1  # points running at once

    @abstractmethod
    def run(self, todo: list[tuple[int, Point]], on_start: Callable[[Point], None] | None = None) -> Iterator[dict]:
        """The entries of ``todo`` (pairs of the point's index in ``study.points(params)`` and the
        point), each once, as they finish; ``on_start(point)`` as a point starts, where known."""

    @abstractmethod
    def close(self) -> None:
        """Free what the executor holds (processes, clusters); safe to call twice."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcess(Executor):
    """Points one after another in this process, with one Context for the whole study."""

    def __init__(self, study: Study, params: dict, engine: str = "local", cluster_nodes: int = 2):
        self.study, self.params = study, params
        self.ctx = Context(engine, cluster_nodes)

    def run(self, todo, on_start=None):
        for _, point in todo:
            if on_start is not None:
                on_start(point)
            yield point_entry(self.study, point, self.params, self.ctx)

    def close(self) -> None:
        self.ctx.close()


class LocalWorkers(Executor):
    """Points spread over ``workers`` worker processes on this machine (``workers.WorkerPool``)."""

    def __init__(self, study: Study, params: dict, workers: int, engine: str = "local", cluster_nodes: int = 2):
        from .workers import WorkerPool

        self.study, self.params, self.engine, self.cluster_nodes = study, params, engine, cluster_nodes
        self.pool = WorkerPool(workers)
        self.workers = self.pool.workers

    def run(self, todo, on_start=None):
        params = json.loads(json.dumps(self.params))  # plain data: it travels to the workers
        tasks = [(self.study.name, params, index, point.key, self.engine, self.cluster_nodes) for index, point in todo]
        started = None if on_start is None else (lambda i: on_start(todo[i][1]))
        for _, entry in self.pool.run(run_point, tasks, [f"point {label(pt)}" for _, pt in todo], started):
            yield entry

    def close(self) -> None:
        self.pool.close()


def make_executor(study: Study, params: dict, engine: str = "local", cluster_nodes: int = 2, workers: int = 1,
                  scheduler: str = "", scheduler_security: str = "", point_resources: dict | None = None,
                  points: int | None = None) -> Executor:
    """The executor ``pmgd study`` options ask for: ``scheduler`` (an address, or ``local`` for a
    local Dask cluster of ``workers`` processes) wins; else ``workers`` 1 runs in this process and
    more in as many local worker processes (never more than ``points``, the points to run)."""
    from .workers import check_workers

    check_workers(workers)
    if scheduler:
        from .dask_executor import DaskExecutor

        return DaskExecutor(study, params, scheduler, workers=workers, security=scheduler_security,
                            resources=point_resources, engine=engine, cluster_nodes=cluster_nodes)
    if point_resources:
        from pmgd_node.config import ConfigError

        raise ConfigError("point-resources", "needs a Dask cluster (--scheduler): only its workers "
                                             "advertise resources", kind="option")
    workers = min(workers, points) if points else workers
    if workers <= 1:
        return InProcess(study, params, engine, cluster_nodes)
    return LocalWorkers(study, params, workers, engine, cluster_nodes)
