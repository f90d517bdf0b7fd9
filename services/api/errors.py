"""What the job controller (``jobs.py``) and the scoring paths (``scoring.py``) refuse, free of HTTP.

``str(err)`` is the message a client sees. The routers map each class to one HTTP status
(``routes/deps.py``: ``http_status``): :class:`JobNotFound` 404, :class:`JobConflict` 409,
:class:`InvalidJob` 422, :class:`EvaluatorFailed` the evaluator's own 4xx or else 502.
"""

from __future__ import annotations


class JobError(Exception):
    """A request on a job that the controller refuses."""


class JobNotFound(JobError):
    """No such job, or nothing of it yet (no checkpoint)."""


class JobConflict(JobError):
    """Not possible now: the job's state forbids it, or the engine is busy, absent or silent."""


class InvalidJob(JobError):
    """A job config or a request the job cannot take (the message names the field)."""


class EvaluatorFailed(JobError):
    """The evaluator service could not be reached or refused; ``status`` is its HTTP answer
    (None when there was none)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
