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

# User-defined models: `Task` (services/evaluator/user_model.py) joins these exports, imported
# here, once it exists; a job names its model with the JobConfig field ``model``.
__all__ = ["ConfigError", "JobConfig", "Result", "__version__", "train"]
