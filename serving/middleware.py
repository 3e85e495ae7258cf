"""Pure ASGI middleware (no BaseHTTPMiddleware: it costs a task per request).

`GuardMiddleware` does three cheap things for every request: refuses bodies over the size limit
with 422 (by Content-Length, or by counting a chunked body; like every other invalid input, in
the same ``detail`` layout as a validation error), records the latency histogram per
route template, and logs slow or failed requests without the client address, query string,
headers or body (those can carry personal data, keys and tokens).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.metrics import Metrics

log = logging.getLogger("aipic.serving.http")
SLOW_SECONDS = 0.25


TOO_LARGE_STATUS = 422


def _too_large(limit: int) -> tuple[dict[str, Any], bytes]:
    detail = {
        "loc": ["body"],
        "msg": f"request body larger than {limit} bytes (AIPIC_MAX_BODY_BYTES); send a smaller body",
        "type": "body_too_large",
    }
    body = json.dumps({"detail": [detail]}).encode()
    start = {
        "type": "http.response.start",
        "status": TOO_LARGE_STATUS,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    return start, body


class GuardMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                break

        async def reply(start: dict[str, Any], body: bytes) -> None:
            await send(start)
            await send({"type": "http.response.body", "body": body})

        if declared is not None and (declared < 0 or declared > self.max_body):
            start, body = _too_large(self.max_body)
            await reply(start, body)
            self._observe(scope, TOO_LARGE_STATUS, started)
            return

        if declared is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            # chunked body: read it here, within the limit, then replay it
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    start, body = _too_large(self.max_body)
                    await reply(start, body)
                    self._observe(scope, TOO_LARGE_STATUS, started)
                    return
                chunks.append(chunk)
                more = bool(message.get("more_body", False))
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def replay_receive() -> Message:
                return replay.pop() if replay else await receive()

            receive = replay_receive

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._observe(scope, status, started)

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        self.metrics.latency.labels(method, template, str(status)).observe(elapsed)
        if status >= 500 or elapsed > SLOW_SECONDS:
            log.warning("%s %s -> %d in %.1f ms", method, template, status, elapsed * 1000)
