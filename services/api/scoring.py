"""Scoring a job's checkpoint on a data split: by the evaluator service, or in this process.

``POST /jobs/{id}/evaluate`` uses one or the other (the evaluator when the API was started
with ``--evaluator URL``), and a run's held-out series (``jobs.py``) uses the service. Every
call of the evaluator service goes through :meth:`EvaluatorService.score`, on httpx, with the
evaluator's bearer token (``--evaluator-token``) when it has one (the ``pmgd jobs`` client in
``client.py`` is the API's own client, on the standard library). No HTTP types leave this
module: a failure is an :class:`~.errors.EvaluatorFailed` or an :class:`~.errors.InvalidJob`.
"""

from __future__ import annotations

import dataclasses

from pmgd_node.config import JobConfig

from .errors import EvaluatorFailed, InvalidJob


@dataclasses.dataclass(frozen=True)
class EvaluatorService:
    """The evaluator service at ``url`` (``pmgd evaluator``'s HTTP face), called with
    ``Authorization: Bearer <token>`` when ``token`` is set."""

    url: str
    token: str = ""

    def score(self, config: JobConfig, npz: bytes, split: str = "test", run: int = 0, limit: int = 0,
              timeout_s: float = 600.0) -> dict:
        """Run ``run`` of the checkpoint ``npz`` scored by the service (``POST
        /evaluate/checkpoint``); its report as it answered it.

        Raises :class:`EvaluatorFailed`: without ``status`` when the service cannot be reached or
        refuses this API's token (the API's setting, not the client's request, is at fault), with
        its HTTP status and ``detail`` when it refuses the request.
        """
        import httpx

        params = {"task": config.task, "network": config.network, "split": split, "run": run,
                  "limit": limit, "data_dir": config.data_dir or ""}
        headers = {"content-type": "application/octet-stream"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        try:
            r = httpx.post(self.url.rstrip("/") + "/evaluate/checkpoint", params=params, content=npz,
                           timeout=timeout_s, headers=headers)
        except httpx.HTTPError as err:
            raise EvaluatorFailed(f"evaluator {self.url}: {err}") from None
        if r.status_code >= 400:
            is_json = r.headers.get("content-type", "").startswith("application/json")
            detail = r.json().get("detail", r.text) if is_json else r.text
            if r.status_code == 401:
                raise EvaluatorFailed(f"evaluator {self.url} refused this API's evaluator_token: {detail}")
            raise EvaluatorFailed(f"evaluator: {detail}", r.status_code)
        return r.json()


def score_in_process(config: JobConfig, npz: bytes, split: str = "test", run: int = 0, limit: int = 0) -> dict:
    """Run ``run`` of the checkpoint ``npz`` scored here (``services.evaluator.inference.score``)
    on the first ``limit`` samples (0: all) of ``split``.

    Raises :class:`InvalidJob` for a run the checkpoint lacks or a data set that is missing.
    """
    from services.evaluator.data import job_data
    from services.evaluator.inference import load_checkpoint, score
    from services.evaluator.models import job_model

    try:
        theta, _ = load_checkpoint(npz, run)
        model = job_model(config)
        data = job_data(config, split)
        if limit:
            data = type(data)(data.x[:limit], data.y[:limit], data.num_classes, data.name)
        return score(model, theta, data)
    except (RuntimeError, ValueError) as err:  # a run the job lacks, a missing data set
        raise InvalidJob(str(err)) from None
