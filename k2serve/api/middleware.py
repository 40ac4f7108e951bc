"""Plain ASGI middleware: request ids, the /v1/v1 path alias, and the one read of a
request's body (size limit and read deadline)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass

from k2serve.api.errors import error_response
from k2serve.api.request_scope import STATE_KEY, RequestScope, scope_state
from k2serve.errors import APIError
from k2serve.telemetry import tracing
from k2serve.telemetry.context import REQUEST_ID

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0


class RequestIdMiddleware:
    """Puts the request's RequestScope on it (k2serve.api.request_scope), with its id; every
    reply carries `x-request-id` (the client's own if it sent one). The id is also the
    context's (k2serve.telemetry.context), for log lines and spans, and with tracing on the
    request gets its span here, the parent of its phases' spans."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(b"x-request-id")
        request_id = incoming.decode("latin-1")[:128] if incoming else uuid.uuid4().hex
        scope.setdefault("state", {})[STATE_KEY] = RequestScope(request_id)
        token = REQUEST_ID.set(request_id)
        tracing.tag_current(request_id)  # a server span opened outside (FastAPI's)
        span = None

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"x-request-id", request_id.encode("latin-1"))]
                if span is not None:
                    span.set_attribute("http.response.status_code", message["status"])
            await send(message)

        try:
            with tracing.span("request", **{"http.request.method": scope["method"],
                                            "url.path": scope["path"]}) as span:
                await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)  # a batch line runs inside its runner's task


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


@dataclass(frozen=True)
class BodyLimits:
    """How much body a request may send, and how long it may take to send all of it."""

    max_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    upload_max_bytes: int | None = None  # file uploads (/v1/files): their own, larger limit

    def for_scope(self, scope) -> BodyLimits:
        if self.upload_max_bytes is None or not _is_upload(scope):
            return self
        return BodyLimits(max(self.max_bytes, self.upload_max_bytes), self.timeout_s)


_UPLOAD_PATHS = frozenset({"/v1/files", "/v1/files/upload"})


def _is_upload(scope) -> bool:
    path = scope["path"]
    if scope["method"] == "POST":
        return path in _UPLOAD_PATHS
    return scope["method"] == "PUT" and path.startswith("/v1/files/") and path.endswith("/upload")


# The connection is closed after these: the rest of the body is never read.
_CLOSE = {"connection": "close"}


def _too_large(limits: BodyLimits) -> APIError:
    return APIError(413, f"Request body is larger than this server's limit of "
                         f"{limits.max_bytes} bytes.", code="request_too_large", headers=_CLOSE)


async def read_body(scope, receive, limits: BodyLimits) -> bytes | None:
    """The request's whole body, read once and kept on its RequestScope; None when the
    client left first. Raises APIError 413 (over the limit, by Content-Length before a
    byte is read) or 408 (not all sent within the deadline: a slow client cannot hold a
    connection and its buffered bytes for ever). Callers run it after authentication."""
    rs = scope_state(scope)
    if rs.body is not None:
        return rs.body
    limits = limits.for_scope(scope)
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_bytes:
        raise _too_large(limits)

    async def collect() -> bytes | None:
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limits.max_bytes:  # a chunked body, or a Content-Length lie
                raise _too_large(limits)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    try:
        body = await asyncio.wait_for(collect(), limits.timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"The request body was not received within this server's limit "
                            f"of {limits.timeout_s:g} seconds.", code="request_timeout",
                       type="invalid_request_error", headers=_CLOSE) from None
    if body is not None:
        if b"json" in dict(scope["headers"]).get(b"content-type", b""):
            _refuse_lone_surrogates(body)
        rs.body = body
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_lone_surrogates(body: bytes) -> None:
    """400 for a JSON body that spells a lone UTF-16 surrogate ("\\ud800"): JSON's escapes
    allow it, Unicode does not, and neither a tokenizer nor a UTF-8 reply can hold it. (A
    valid pair decodes to one character, so what remains a surrogate is lone.) Only bodies
    with such an escape are parsed here."""
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return  # the app answers the parse error itself
    stack = [("", doc)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise _lone_surrogate(path or None)
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str) and _SURROGATE.search(value):
            raise _lone_surrogate(path or None)


def _lone_surrogate(param: str | None) -> APIError:
    return APIError(400, "Request body is not valid Unicode: it contains a lone UTF-16 "
                         "surrogate escape (\\ud800-\\udfff without its pair).",
                    param=param, code="invalid_unicode")


def replay(body: bytes, receive):
    """A `receive` that gives the app the body read already, then waits as usual."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect

    return replayed


class BodySizeLimitMiddleware:
    """Reads the body (see read_body) before the app does, unless a layer outside already
    did and passes it on: the app never reads more than the limit or waits past the deadline.
    Read here rather than inside the app, where FastAPI would turn an error raised from the
    body read into a generic 400. Sits inside authentication, so unauthenticated requests
    never get a byte of their body read."""

    def __init__(self, app, limits: BodyLimits | None = None):
        self.app = app
        self.limits = limits or BodyLimits()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope_state(scope).body is not None:  # read outside; `receive` replays it
            return await self.app(scope, receive, send)
        try:
            body = await read_body(scope, receive, self.limits)
        except APIError as exc:
            return await error_response(exc, scope["path"])(scope, receive, send)
        if body is None:
            return  # the client left before sending its body
        await self.app(scope, replay(body, receive), send)
