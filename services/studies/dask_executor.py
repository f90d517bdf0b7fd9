"""A study's points on a Dask distributed cluster: ``pmgd study NAME --scheduler ADDRESS|local``.

Every point is one Dask task, ``sweep.run_point(study, params, index, key, engine, nodes)``
(through :func:`dask_point`),
submitted at once; the runner writes each entry as its task finishes. Dask reruns a task
whose worker died (up to ``distributed.scheduler.allowed-failures`` times, 3 by default) on
another worker, and hands each future's result back once; the runner writes a point's rows
once per key whatever Dask retried, so nothing is lost or counted twice.

* ``local`` starts a Dask ``LocalCluster`` on loopback for the run: a scheduler and
  ``workers`` worker processes (one thread each, and ``cores // workers`` BLAS/OpenMP/torch
  threads, as ``--workers``), stopped at the end.
* Any other address joins a running cluster (``dask scheduler`` and ``dask worker`` on the
  machines, running this same code: ``pip install -e .[distributed]`` there). Beyond
  loopback the cluster must authenticate its peers: the address must be ``tls://`` and the
  certificates come from ``security`` (a folder holding ``ca.pem``, ``cert.pem`` and
  ``key.pem``) or from Dask's own configuration (``distributed.comm.tls.*``, e.g. the
  ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` variables). Dask's TLS is mutual: the scheduler and
  the workers accept only peers whose certificate the CA signed, and so do we.
* ``resources`` (e.g. ``{"GPU": 1}``) are asked of the worker for every point: a worker
  started with ``dask worker ADDRESS --nthreads 1 --resources GPU=1`` (one per device,
  ``CUDA_VISIBLE_DEVICES`` set) then runs one point at a time on its own GPU.

Measured beside Ray before choosing (docs/studies.md, "Running studies in parallel"): Dask
starts a 2-worker local cluster in 2.5 s (Ray 9.9 s) and installs in 44 MB (Ray 259 MB);
its per-task overhead (9 ms against Ray's 1.3 ms) is noise beside a point's seconds.
"""

from __future__ import annotations

import ipaddress
import json
import os
import uuid
from urllib.parse import urlsplit

from pmgd_node.config import ConfigError

from .executor import Executor, label
from .sweep import run_point
from .workers import TaskError, config_error_parts, raise_config_error, thread_env, threads_per_worker

TLS_FILES = {"ca": "ca.pem", "cert": "cert.pem", "key": "key.pem"}
CONNECT_TIMEOUT_S = 30


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def security_from(folder: str):
    """A ``distributed.Security`` from ``folder``'s ca.pem, cert.pem and key.pem (the same
    certificate serves a local cluster's scheduler and workers), encryption required; or, for
    an empty ``folder``, Dask's own configuration."""
    from distributed import Security

    if not folder:
        return Security()
    paths = {k: os.path.join(folder, name) for k, name in TLS_FILES.items()}
    for path in paths.values():
        if not os.path.isfile(path):
            raise ConfigError("scheduler-security", f"{folder} must hold {', '.join(TLS_FILES.values())}; "
                                                    f"{path} is missing", kind="option")
    pair = {f"tls_{who}_{part}": paths[part] for who in ("client", "scheduler", "worker") for part in ("cert", "key")}
    return Security(require_encryption=True, tls_ca_file=paths["ca"], **pair)


def check_address(scheduler: str, security) -> str:
    """``scheduler`` as Dask takes it, refused where the cluster would go unauthenticated."""
    address = scheduler if "://" in scheduler else f"tcp://{scheduler}"
    parts = urlsplit(address)
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or not parts.port:
        raise ConfigError("scheduler", f"must be local, tls://HOST:PORT or (on loopback) tcp://HOST:PORT; "
                                       f"got {scheduler!r}", kind="option")
    secured = bool(security.get_tls_config_for_role("client").get("ca_file"))
    if parts.scheme == "tls" and not secured:
        raise ConfigError("scheduler-security", f"{scheduler} speaks TLS: give the folder of ca.pem, cert.pem and "
                                                "key.pem (or set Dask's distributed.comm.tls configuration)",
                          kind="option")
    if parts.scheme == "tcp" and not is_loopback(parts.hostname):
        raise ConfigError("scheduler", f"{scheduler} is not on loopback, and tcp:// authenticates no one: run the "
                                       "cluster with TLS and use tls://HOST:PORT with --scheduler-security "
                                       "(docs/studies.md)", kind="option")
    return address


def dask_point(*args) -> dict:
    """:func:`sweep.run_point` as a Dask task: a ``ConfigError`` (which does not pickle) comes
    back as ``{"config_error": (field, message, kind)}``, raised again by the runner."""
    try:
        return run_point(*args)
    except ConfigError as err:
        return {"config_error": config_error_parts(err)}


class DaskExecutor(Executor):
    """The points as Dask tasks on the cluster at ``scheduler`` (or a local one, ``"local"``)."""

    def __init__(self, study, params: dict, scheduler: str, workers: int = 2, security: str = "",
                 resources: dict | None = None, engine: str = "local", cluster_nodes: int = 2):
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise ConfigError("scheduler", "needs Dask distributed: pip install -e '.[distributed]'",
                              kind="option") from None
        self.study, self.params, self.engine, self.cluster_nodes = study, params, engine, cluster_nodes
        self.resources = dict(resources or {}) or None
        self.cluster = None
        sec = security_from(security)
        if scheduler == "local":
            if self.resources:
                raise ConfigError("point-resources", "a local Dask cluster's workers advertise no resources: start "
                                                     "workers with dask worker --resources (docs/studies.md)",
                                  kind="option")
            import dask

            self.workers = workers
            threads = thread_env(threads_per_worker(workers))
            # The BLAS/OpenMP variables must be in a worker's environment as it starts (before
            # numpy loads): Dask's "pre-spawn" environment, which its nannies (in this process)
            # also set here, so ours is put back at close.
            self._environ = {name: os.environ.get(name) for name in threads}
            spawn_env = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **threads}
            with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_env}):
                # The scheduler serves HTTP (health, metrics, task pages) whatever the dashboard
                # setting: on a loopback port of its own, never the fixed 8787 another run may hold.
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                            host="127.0.0.1", dashboard_address="127.0.0.1:0", env=threads,
                                            protocol="tls" if security else "tcp",
                                            security=sec if security else None)
            self.client = Client(self.cluster, security=sec if security else None)
        else:
            address = check_address(scheduler, sec)
            try:
                self.client = Client(address, security=sec, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as err:
                raise RuntimeError(f"could not reach the Dask scheduler at {scheduler}: {err}") from None
            self.workers = max(1, len(self.client.scheduler_info().get("workers", {})))

    def run(self, todo, on_start=None):
        from distributed import as_completed

        params = json.loads(json.dumps(self.params))
        run = uuid.uuid4().hex[:8]  # task keys unique to this run: a resumed study's are new tasks
        futures, names = [], {}
        for index, point in todo:
            future = self.client.submit(dask_point, self.study.name, params, index, point.key, self.engine,
                                        self.cluster_nodes, key=f"pmgd-{self.study.name}-{index}-{run}",
                                        pure=False, resources=self.resources)
            futures.append(future)
            names[future.key] = label(point)
        for future in as_completed(futures):
            try:
                entry = future.result()
            except Exception as err:  # the point raised, or its workers kept dying (KilledWorker)
                raise TaskError(f"point {names[future.key]} failed: {type(err).__name__}: {err}") from err
            future.release()
            if "config_error" in entry:
                raise_config_error(entry["config_error"], f"point {names[future.key]}")
            yield entry

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
            for name, value in self._environ.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
