"""Studies (``pmgd study NAME``): sweeps that turn PMGD runs into CSVs, summaries and figures.

Each study lives in its own module and registers itself in ``STUDIES`` (name → Study class);
``sweep.py`` runs any of them.
"""

from __future__ import annotations

import importlib

from .sweep import Study

# name → module holding a Study subclass of that name; imported on use (torch, matplotlib).
MODULES = {
    "fig2": "fig2", "fig4": "fig4", "fig5": "fig5", "table1": "table1",
    "latency": "links", "jitter": "links", "drop": "links", "drift": "links", "noise": "noise",
    "cnn": "cnn", "transfer": "transfer",
}


def get(name: str) -> Study:
    from pmgd_node.config import ConfigError

    if name not in MODULES:
        raise ConfigError(name, f"no such study; the studies: {', '.join(MODULES)}", kind="study")
    module = importlib.import_module(f"services.studies.{MODULES[name]}")
    return module.STUDIES[name]()
