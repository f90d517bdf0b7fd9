"""``pmgd.train``: one job from Python, run by the same code as `pmgd train`."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pmgd_node.config import ConfigError, JobConfig, read_mapping

from .result import Result

if TYPE_CHECKING:
    from rich.console import Console

    from pmgd_node.shell.keys import Keys

ENGINES = ("local", "cluster")


def train(config: JobConfig | str | os.PathLike | Mapping[str, Any] | None = None, *, engine: str = "local",
          cluster: str = "", device: str | None = None, progress: bool = True, keys: Keys | str | None = None,
          key_name: str | None = None, console: Console | None = None, **fields: Any) -> Result:
    """Train one job (all its seeds) to its stopping rule and return its :class:`~pmgd.Result`.

    The job is ``config`` with the job-config ``fields`` given as keywords over it, the way
    `pmgd train`'s flags override its ``--config`` file::

        pmgd.train(task="parity2", perturbation="rcm", seeds=20)
        pmgd.train(config="configs/parity2-rcm.toml", seeds=5, progress=False)
        pmgd.train(pmgd.JobConfig(task="parity3"), engine="cluster", nodes=2)

    ``config``: nothing (the defaults of :class:`~pmgd.JobConfig`), a JobConfig, the path of
    a JSON or TOML file of fields, or a mapping of fields. A JobConfig's fields count as set
    where they differ from the defaults (its network too, unless it is the one its task
    implies), so ``task=`` over it derives the network again, and on a running cluster a
    job whose ``nodes`` is the default 1 takes every connected node, as an unset ``nodes``
    does in `pmgd train --cluster`.

    ``engine``: "local", the in-process engine, or "cluster", broadcaster and node processes
    over ZeroMQ: the running cluster whose control endpoint is ``cluster`` (``pmgd up``
    prints it; ``keys`` is its key directory or a loaded ``Keys``, default ``$PMGD_KEYS``,
    our pair ``key_name`` in it, default ``$PMGD_KEY_NAME`` or "client"), or, when
    ``cluster`` is empty, a local cluster of ``nodes`` processes started for this job.
    ``device``: the torch device of the engine's CNN models (default: cuda if available).
    ``progress``: draw `pmgd train`'s progress bar and summary table on ``console`` (default:
    a rich console on stderr; in a notebook rich draws in the cell, the live bar through
    ipywidgets, without which rich warns and shows the table alone); False: print nothing.

    A bad field name or value, or a bad argument, raises :class:`~pmgd.ConfigError` naming
    it before anything heavy loads.
    """
    started = time.perf_counter()  # the summary's wall time: from the call, as `pmgd train`'s from the command
    given = _fields_of(config)
    given.update(fields)
    job = JobConfig.from_dict(given)  # unknown fields and bad values stop here, naming the field
    if engine not in ENGINES:
        raise ConfigError("engine", f"must be one of {', '.join(ENGINES)}; got {engine!r}", kind="argument")
    if cluster and engine != "cluster":
        raise ConfigError("cluster", f"a control endpoint is for engine='cluster'; got engine={engine!r}",
                          kind="argument")
    loaded = None
    if cluster:
        from pmgd_node.shell import keys as cluster_keys
        from services.cluster.client import fit_to_cluster

        if keys is None or isinstance(keys, str | os.PathLike):
            directory = os.environ.get("PMGD_KEYS", "") if keys is None else os.fspath(keys)
            loaded = cluster_keys.load_optional(directory, key_name or os.environ.get("PMGD_KEY_NAME", "client"))
        else:
            loaded = keys
        job = JobConfig.from_dict(fit_to_cluster(given, cluster, keys=loaded))

    from rich.console import Console

    from services.train import run_job, summary_table  # heavy imports (torch) only once a job runs

    console = console or Console(stderr=True)
    result, summary, theta0 = run_job(job, engine=engine, device=device, progress=progress, console=console,
                                      cluster=cluster, keys=loaded, started=started)
    if progress:
        console.print(summary_table(summary))
    return Result(summary, job, theta0, list(result.history), result)


def _fields_of(config) -> dict[str, Any]:
    """The job-config fields ``config`` sets, as `pmgd train` reads a ``--config`` file."""
    if config is None:
        return {}
    if isinstance(config, JobConfig):
        return _set_fields(config)
    if isinstance(config, str | os.PathLike):
        path = os.fspath(config)
        fields = read_mapping(path)
        JobConfig.from_dict(fields)  # the file alone must be a valid job: its errors name it, not a keyword
        return dict(fields)
    if isinstance(config, Mapping):
        return dict(config)
    raise ConfigError("config", "must be a JobConfig, the path of a JSON or TOML file, or a mapping of fields; "
                                f"got {type(config).__name__}", kind="argument")


def _set_fields(config: JobConfig) -> dict[str, Any]:
    """The fields of ``config`` that differ from the defaults, less the network when it is
    the one the other fields imply (the task's reference network, or the user's model)."""
    defaults = JobConfig().to_dict()
    fields = {name: value for name, value in config.to_dict().items() if value != defaults[name]}
    if "network" in fields:
        implied = JobConfig.from_dict({k: v for k, v in fields.items() if k != "network"}).network
        if implied == fields["network"]:
            del fields["network"]
    return fields
