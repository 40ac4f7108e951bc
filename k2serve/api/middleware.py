"""Plain ASGI middleware: request ids, the body-size limit, and the /v1/v1 path alias."""

from __future__ import annotations

import json
import uuid

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


def _error_message(status: int, message: str, code: str) -> tuple[dict, dict]:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()),
                         (b"x-should-retry", b"false")]}
    return start, {"type": "http.response.body", "body": body}


class RequestIdMiddleware:
    """Every reply carries `x-request-id` (the client's own if it sent one)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(b"x-request-id")
        request_id = incoming.decode("latin-1")[:128] if incoming else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


class PathAliasMiddleware:
    """`together` 3.x given a base URL ending in /v1 requests /v1/v1/...: serve it anyway."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/v1/"):
            scope = dict(scope)
            scope["path"] = scope["path"][3:]
            scope["raw_path"] = scope["path"].encode()
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, by Content-Length or while a chunked body streams."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = (f"Request body is larger than this server's limit of {self.max_bytes} bytes.",
                   "request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            start, body = _error_message(413, *message)
            await send(start)
            await send(body)
            return

        # Read the body here, up to the limit, then replay it: an error raised from inside
        # the app's own body read would be turned into a generic 400 by FastAPI.
        chunks: list[bytes] = []
        received = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                start, body = _error_message(413, *message)
                await send(start)
                await send(body)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as usual

        await self.app(scope, replay_receive, send)
