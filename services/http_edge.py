"""The edge every pmgd HTTP service shares (the API, the evaluator): the gate in front of each
mutating request, and the documented shape of what it refuses.

:class:`Guard`: with a token configured, ``POST``/``PUT``/``PATCH``/``DELETE`` without
``Authorization: Bearer <token>`` get 401 at once: a stranger's body is never read, parsed
or held (a malformed one gets 401, not 422). Bodies are capped at ``max_body`` bytes: a
declared ``Content-Length`` above it gets 413 at once; a body without one is read up to the
cap and refused with 413 when it passes it, so no request holds more than ``max_body`` in
memory. Reads (``GET``) stay open.

:func:`refusals` documents a route's 4xx/5xx answers in its OpenAPI spec: ``{"detail":
message}`` (:class:`Refusal`), and for 422 either that or FastAPI's own list of issues for a
request that does not fit the schema (:class:`Invalid`).
"""

from __future__ import annotations

import hmac
import json

from pydantic import BaseModel

# The largest body the API takes is a job config (a few kB with per-node link overrides).
MAX_BODY = 1 << 20
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
AUTH_DETAIL = "authorization: a valid 'Bearer <token>' header is required"


def bearer_ok(header: bytes, token: str) -> bool:
    """Does an ``Authorization`` header carry ``Bearer <token>``? (Constant time; no token: open.)"""
    return not token or hmac.compare_digest(header, f"Bearer {token}".encode())


def _answer(status: int, detail: str, extra: list[tuple[bytes, bytes]] = ()):
    body = json.dumps({"detail": detail}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *extra]}
    return start, {"type": "http.response.body", "body": body}


class Guard:
    """ASGI middleware: token first, then a body of at most ``max_body`` bytes, then the app."""

    def __init__(self, app, token: str, max_body: int = MAX_BODY):
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if not bearer_ok(headers.get(b"authorization", b""), self.token):
            return await self._send(send, 401, AUTH_DETAIL, [(b"www-authenticate", b"Bearer")])
        too_large = f"request body: at most {self.max_body:,} bytes"
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await self._send(send, 413, too_large)
        # Read the body here, up to the cap, and hand it on: nothing larger is ever held.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._send(send, 413, too_large)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnects

        return await self.app(scope, replay, send)

    @staticmethod
    async def _send(send, status: int, detail: str, extra=()) -> None:
        start, body = _answer(status, detail, list(extra))
        await send(start)
        await send(body)


class Refusal(BaseModel):
    """A refusal in words: ``{"detail": message}`` (the message names the field at fault)."""

    detail: str


class Issue(BaseModel):
    """One item of FastAPI's own 422 list: where the request does not fit the schema, and how."""

    loc: list[str | int]
    msg: str
    type: str


class Invalid(BaseModel):
    """422: a message naming the field, or FastAPI's list of issues for a request that does not
    fit the schema at all."""

    detail: str | list[Issue]


# What each refusal means, wherever it is documented (a route's own wording goes in its docstring).
MEANING = {
    400: "a body that is not even text (FastAPI cannot decode it to parse it)",
    401: "a token is configured and the request lacks 'Authorization: Bearer <token>'",
    403: "a directory outside those the service was started with",
    404: "not found",
    409: "not possible now (the job's state, or an engine that is busy, absent or silent)",
    413: "request body larger than the service takes",
    422: "a value the service cannot take (the message names the field)",
    502: "a service behind this one could not be reached or refused it",
}


def refusals(*statuses: int) -> dict[int, dict]:
    """``responses=`` for a route that may answer with ``statuses``: each documented with its
    :data:`MEANING` and its body (:class:`Invalid` for 422, :class:`Refusal` otherwise)."""
    return {s: {"model": Invalid if s == 422 else Refusal, "description": MEANING[s]} for s in statuses}
