"""The API's one settings object (docs/architecture.md §4: settings at the edge).

``pmgd api`` reads it once (``app.main``: env ``PMGD_API_<FIELD>``, flags override, see
``pmgd_node/shell/settings.py``) and hands it to ``create_app``; nothing below reads the
environment.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ApiSettings:
    """Env ``PMGD_API_<FIELD>`` (flags override)."""

    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "pmgd.sqlite"
    token: str = ""  # bearer token for mutating requests ("" = open)
    broadcaster: str = ""  # control endpoint of the cluster ("" = local engine only)
    keys: str = ""  # the cluster's key directory (env PMGD_KEYS too; "" = a broadcaster without keys)
    key_name: str = "client"  # the API's key pair in it
    evaluator: str = ""  # base URL of the evaluator service ("" = score checkpoints in-process)
    evaluator_token: str = ""  # the evaluator's bearer token, sent with every scoring request ("" = none)
    data_dir: str = ""  # default data directory for jobs that name none
    # Directories (separated by os.pathsep, ':') whose .py files a job's ``model`` may name: a
    # model is code the server runs, so "" accepts no custom models over the API.
    model_roots: str = ""
    max_local_jobs: int = 2  # local-engine jobs running at once (each takes a core)
