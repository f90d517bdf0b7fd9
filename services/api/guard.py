"""The gate in front of every mutating request, before any of its body is read.

With a token configured, ``POST``/``PUT``/``PATCH``/``DELETE`` without ``Authorization:
Bearer <token>`` get 401 at once: a stranger's body is never read, parsed or held (a
malformed one gets 401, not 422). Bodies are capped at ``MAX_BODY`` bytes: a declared
``Content-Length`` above it gets 413 at once; a body without one is read up to the cap and
refused with 413 when it passes it, so no request holds more than ``MAX_BODY`` in memory.
The routes keep their own token dependency (it documents the rule in ``/openapi.json``).
"""

from __future__ import annotations

import hmac
import json

# The largest body any route takes is a job config (a few kB with per-node link overrides).
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
    """ASGI middleware: token first, then a bounded body, then the app."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if not bearer_ok(headers.get(b"authorization", b""), self.token):
            return await self._send(send, 401, AUTH_DETAIL, [(b"www-authenticate", b"Bearer")])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            return await self._send(send, 413, f"request body: at most {MAX_BODY:,} bytes")
        # Read the body here, up to the cap, and hand it on: nothing larger is ever held.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                return await self._send(send, 413, f"request body: at most {MAX_BODY:,} bytes")
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
