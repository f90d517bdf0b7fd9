"""PMGD from Python: train a job in a notebook or a script, get its numbers back.

    import pmgd
    result = pmgd.train(task="parity2", perturbation="rcm", seeds=20)
    result.summary          # what `pmgd train --json` writes
    result.runs()           # one dict per run: seed, solved, ticks to solution, final cost and accuracy
    result.to_pandas()      # one row per (run, evaluation), with pandas installed

:func:`train` runs the same code as `pmgd train` (services/train.py ``run_job``), on the
in-process engine or a cluster. Importing this package is light: torch and the engine load
only when a job runs.
"""

from importlib.metadata import PackageNotFoundError, version

from pmgd_node.config import ConfigError, JobConfig

from .result import Result
from .training import train

try:
    __version__ = version("pmgd-cluster")  # the distribution's name in pyproject.toml
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["ConfigError", "JobConfig", "Result", "Task", "__version__", "train"]


def __getattr__(name: str):
    # ``pmgd.Task``, the typed form of what a model file's task function returns
    # (docs/bring-your-own.md), loads its module (numpy) only when it is asked for.
    if name == "Task":
        from services.evaluator.user_model import Task

        return Task
    raise AttributeError(f"module 'pmgd' has no attribute {name!r}")
