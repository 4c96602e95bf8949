"""What every HTTP request passes through before a handler sees it: a request id, the body limit (with or
without Content-Length), the API key, the shutdown gate, the request count, and the last line of defence
against a 5xx (logged with the request id, which the response carries).

A plain ASGI middleware, not ``@app.middleware("http")``: it reads the body itself (so a chunked body is
capped as it arrives, not after) and passes the client's disconnect through untouched, which handlers
watch to cancel their work.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import uuid
from collections.abc import Callable

log = logging.getLogger("llama3.server")

MAX_BODY_BYTES = 4 * 1024 * 1024
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics",
             "/tokenize", "/detokenize")
OPEN_PATHS = ("/health", "/metrics")  # answered while draining; /health also without the API key
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def endpoint_of(path: str) -> str:
    """The label a request is counted under in /metrics (a fixed set: no label per client-chosen path)."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in ENDPOINTS else "other"


class Guard:
    """``gate()`` is True while requests may be admitted (False: 503 with Retry-After, during shutdown);
    ``count(endpoint, status)`` records each answer; ``inflight`` is how many admitted requests are running."""

    def __init__(self, app, *, api_key: str | None, gate: Callable[[], bool], count: Callable[[str, int], None],
                 max_body: int = MAX_BODY_BYTES):
        self.app, self.api_key, self.gate, self.count, self.max_body = app, api_key, gate, count, max_body
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if _CLIENT_ID.fullmatch(given) else "req-" + uuid.uuid4().hex[:24]
        scope.setdefault("state", {})["request_id"] = rid
        path, status = scope["path"], [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        async def refuse(code: int, message: str, type_: str, error_code: str, extra: dict | None = None):
            body = json.dumps(error_body(message, type_, None, error_code)).encode()
            head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *((k.encode(), v.encode()) for k, v in (extra or {}).items())]
            await send_with_id({"type": "http.response.start", "status": code, "headers": head})
            await send_with_id({"type": "http.response.body", "body": body})

        try:
            problem = self._check(path, scope["method"], headers)
            if problem:
                return await refuse(*problem)
            body, too_big = await self._read_body(headers, receive)
            if too_big:
                return await refuse(413, f"the request body exceeds the limit of {self.max_body} bytes",
                                    "invalid_request_error", "body_too_large", {"connection": "close"})
            self.inflight += path not in OPEN_PATHS
            try:
                await self.app(scope, _replay(body, receive), send_with_id)
            finally:
                self.inflight -= path not in OPEN_PATHS
        except Exception:  # noqa: BLE001 - a bug, not the client's: log it with its id, answer, keep serving
            log.exception("internal error in %s %s (request id %s)", scope["method"], path, rid)
            if not status[0]:
                await refuse(500, f"internal error (request id {rid})", "server_error", "internal_error")
            else:  # the response had begun (a stream): the client sees the connection end
                status[0] = 500
        finally:
            self.count(endpoint_of(path), status[0] or 499)  # 499: the client left before any answer

    def _check(self, path: str, method: str, headers: dict) -> tuple | None:
        """(status, message, type, code[, headers]) for a request refused on its headers alone."""
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return (413, f"request body of {length} bytes exceeds the limit of {self.max_body}",
                    "invalid_request_error", "body_too_large", {"connection": "close"})
        if self.api_key and path != "/health" and method != "OPTIONS":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            # RFC 7235: the scheme is case-insensitive; the key is compared in constant time
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return (401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                        "authentication_error", "invalid_api_key")
        if path not in OPEN_PATHS and not self.gate():
            return (503, "the server is shutting down; retry on another instance or later",
                    "service_unavailable", "shutting_down", {"retry-after": "5", "connection": "close"})
        return None

    async def _read_body(self, headers: dict, receive) -> tuple[bytes, bool]:
        """The whole body, counted as it arrives (chunked bodies have no Content-Length to check first)."""
        if headers.get("content-length") in (None, "0") and "chunked" not in headers.get("transfer-encoding", ""):
            return b"", False
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body
                return b"", False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", True
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts), False


def _replay(body: bytes, receive):
    """A receive() that gives the buffered body once, then the client's own messages (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed
