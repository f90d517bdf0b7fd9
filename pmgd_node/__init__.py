"""The parameter node: pure PMGD algorithm core (perturbation, integrator, update rule,
cost-variation extraction, job config) plus, later, the node process and wire protocol."""

from .config import ConfigError, JobConfig

__all__ = ["ConfigError", "JobConfig"]
