"""The platform's ASGI middleware: API keys, limits, rate-limit headers, ledger rows.

It sits inside the request-id / path-alias middleware, so it sees the final path and the
request's RequestScope (k2serve.api.request_scope), and outside the body read: it checks the
key before any body byte is read, then reads a generation's body itself (once, bounded in
size and time: k2serve.api.middleware). Deny by default: every path but the public ones below
needs a key, unless the server runs open (loopback, no key ever made — and then only for
loopback Host/Origin values).

It tells the routes who is calling (`RequestScope.caller`) and, for a generation, whom to
report its usage to (`RequestScope.usage`: the settlement's LedgerObserver). A request
without a generation (a refusal, a 4xx from the route) gets its row from the reply.
"""

from __future__ import annotations

import json
import logging
import uuid

from starlette.datastructures import Headers

from k2serve.api.batch_runner import BATCH_SCOPE
from k2serve.api.errors import error_response
from k2serve.api.media_links import PATH as SIGNED_MEDIA
from k2serve.api.middleware import BodyLimits, read_body, replay
from k2serve.api.request_scope import scope_state
from k2serve.api.routes.files import PRESIGNED_UPLOAD
from k2serve.errors import APIError
from k2serve.platform.context import RequestContext, log_request
from k2serve.platform.form_fields import multipart_model
from k2serve.platform.service import Platform
from k2serve.telemetry import tracing
from k2serve.telemetry.metrics import KEY_LIMIT, KEY_REQUESTS, RATE_LIMITED

log = logging.getLogger("k2serve.platform")

GENERATION_PATHS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions",
                    "/v1/moderations": "moderations", "/v1/embeddings": "embeddings",
                    "/v1/rerank": "rerank",
                    "/v1/messages": "messages", "/v1/responses": "responses"}  # agents' APIs
GENERATION_PATHS.update({  # billed by audio seconds / characters (k2serve.api.routes.audio)
    "/v1/audio/speech": "audio.speech", "/v1/audio/generations": "audio.speech",
    "/v1/audio/transcriptions": "audio.transcribe", "/v1/audio/translations": "audio.translate"})
GENERATION_PATHS.update({  # billed per image / video and megapixel-step (k2serve.diffusion)
    "/v1/images/generations": "images", "/v2/videos": "videos", "/v1/videos": "videos"})
PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIX = "/playground"  # static files; the page's API calls carry the user's key
ADMIN_PREFIX = "/admin/"
ADMIN_PATHS = frozenset({"/metrics"})  # with /admin/...: an admin key, unless open mode
_CAPTURE_LIMIT = 1 << 20


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path == PUBLIC_PREFIX or path.startswith(PUBLIC_PREFIX + "/")


class PlatformMiddleware:
    def __init__(self, app, platform: Platform, body_limits: BodyLimits | None = None):
        self.app = app
        self.platform = platform
        self.body_limits = body_limits or BodyLimits()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _public(scope["path"]) or (
                scope["method"] == "PUT" and PRESIGNED_UPLOAD.fullmatch(scope["path"])) or (
                scope["method"] in ("GET", "HEAD") and SIGNED_MEDIA.fullmatch(scope["path"])):
            return await self.app(scope, receive, send)  # an upload URL's or a media link's
            # signature is its key
        platform = self.platform
        rs = scope_state(scope)
        rs.request_id = rs.request_id or uuid.uuid4().hex
        ctx = RequestContext(request_id=rs.request_id, method=scope["method"], path=scope["path"],
                             scope=rs)
        headers = Headers(scope=scope)

        batch = scope.get(BATCH_SCOPE)  # a batch line, run in-process: its batch's key
        try:
            if batch is not None:
                key = await platform.batch_caller(batch.get("key_id"))
                ctx.batch_id = batch.get("batch_id")
            else:
                key = await platform.authenticate(_authorization(headers),
                                                  host=headers.get("host"),
                                                  origin=headers.get("origin"))
        except APIError as exc:
            return await self._refuse(ctx, exc, scope, receive, send)
        ctx.key = rs.caller = key

        admin_only = scope["path"].startswith(ADMIN_PREFIX) or scope["path"] in ADMIN_PATHS
        if admin_only and key is not None and not key.is_admin:
            return await self._refuse(ctx, APIError(
                403, f"The API key '{key.name}' is not an admin key (`k2serve keys create "
                     f"--admin`).", code="admin_key_required"), scope, receive, send)

        endpoint = GENERATION_PATHS.get(scope["path"]) if scope["method"] == "POST" else None
        if endpoint is None:
            extra = await platform.rate_limit_headers(key)
            try:
                await self.app(scope, receive, self._sender(ctx, send, extra))
            finally:
                log_request(ctx, "ok" if (ctx.status or 500) < 400 else "rejected")
            return

        ctx.endpoint = endpoint
        try:  # only now, the key known: read the body (once; the layers inside reuse it)
            raw = await read_body(scope, receive, self.body_limits)
        except APIError as exc:
            return await self._refuse(ctx, exc, scope, receive, send)
        if raw is None:
            return  # the client left before sending its body
        receive = replay(raw, receive)
        try:
            body = json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError, RecursionError):  # the route answers 400
            body = {}
        if not isinstance(body, dict):
            body = {}
        model = body.get("model")
        if model is None and headers.get("content-type", "").startswith("multipart/"):
            model = multipart_model(raw, headers["content-type"])  # audio uploads
            body = {"model": model} if model is not None else body
        ctx.model = rs.model = model[:256] if isinstance(model, str) else None
        try:
            with tracing.span("admission", **{"k2serve.endpoint": endpoint}):
                await platform.admit(ctx, body, raw, headers)
            with tracing.span("ledger write", **{"k2serve.ledger.status": "in_progress"}):
                rs.usage = await platform.open_row(ctx)  # its row exists before the app runs
        except APIError as exc:
            return await self._refuse(ctx, exc, scope, receive, send)
        if ctx.replay is not None:  # the same request completed before: its stored reply
            try:
                await platform.send_replay(ctx, send)
            finally:
                platform.after_app(ctx)
            return

        extra = ctx.decision.headers() if ctx.decision is not None else {}
        sender = self._sender(ctx, send, extra)
        if ctx.slot is not None:  # stores the reply for a retry (README: "Retries")
            sender = platform.recording_sender(ctx, sender)
        try:
            await self.app(scope, receive, sender)
        finally:
            platform.after_app(ctx)

    async def _refuse(self, ctx: RequestContext, exc: APIError, scope, receive, send) -> None:
        ctx.refused = True
        ctx.error_code = exc.code
        response = error_response(exc, scope["path"])
        try:
            await response(scope, receive, self._sender(ctx, send, {}))
        finally:
            if ctx.endpoint is not None and ctx.key is not None:
                self.platform.after_app(ctx)  # a ledger row for a refused generation
            else:
                log_request(ctx, "rejected")

    def _sender(self, ctx: RequestContext, send, extra: dict[str, str]):
        """Adds the rate-limit headers; keeps the status, and the usage of a generation
        endpoint's reply when no tracker reports it (e.g. completions with max_tokens=0)."""
        state = {"json": False, "sse": False, "buf": bytearray()}

        async def sender(message):
            kind = message["type"]
            if kind == "http.response.start":
                ctx.status = message["status"]
                _count(ctx)
                raw_headers = list(message.get("headers", []))
                if extra:
                    present = {k.lower() for k, _ in raw_headers}
                    raw_headers += [(k.encode("latin-1"), v.encode("latin-1"))
                                    for k, v in extra.items() if k.encode() not in present]
                    message = dict(message, headers=raw_headers)
                if ctx.endpoint is not None and ctx.tracker is None:
                    ctype = {k.lower(): v for k, v in raw_headers}.get(b"content-type", b"")
                    state["sse"] = ctype.startswith(b"text/event-stream")
                    state["json"] = ctype.startswith(b"application/json")
            elif kind == "http.response.body":
                chunk = message.get("body", b"")
                if state["sse"]:
                    if b'"usage":{' in chunk:
                        _capture_sse_usage(ctx, chunk)
                elif state["json"] and len(state["buf"]) + len(chunk) <= _CAPTURE_LIMIT:
                    state["buf"] += chunk
                    if not message.get("more_body", False):
                        _capture_json(ctx, bytes(state["buf"]))
                if ctx.status == 429 and not message.get("more_body", False):
                    _count_refusal(ctx)  # after the capture: the reply's error code
                if ctx.entry_id is not None and ctx.batch_id is not None:
                    # A batch line: its runner stores the reply as it receives it, and only
                    # then is the row committed, so a crash between the two leaves a line
                    # that is not run again (its row closed as interrupted), never one run
                    # and billed twice.
                    await send(message)
                    await self.platform.before_body(ctx, not message.get("more_body", False))
                    return
                if ctx.entry_id is not None:  # usage committed before the bytes leave
                    await self.platform.before_body(ctx, not message.get("more_body", False))
            await send(message)

        return sender


def _count(ctx: RequestContext) -> None:
    """Per-key metrics: each request (its rate is the key's RPM) and the key's limits."""
    key = ctx.key
    if key is None:
        return
    KEY_REQUESTS.labels(key.name).inc()
    if key.rpm_limit:
        KEY_LIMIT.labels(key.name, "rpm").set(key.rpm_limit)
    if key.tpm_limit:
        KEY_LIMIT.labels(key.name, "tpm").set(key.tpm_limit)


def _count_refusal(ctx: RequestContext) -> None:
    """A 429, by key and code (rate_limit_exceeded, insufficient_quota,
    too_many_concurrent_requests, ...)."""
    RATE_LIMITED.labels(ctx.key.name if ctx.key is not None else "",
                        ctx.error_code or "unknown").inc()


def _authorization(headers: Headers) -> str | None:
    """The Authorization header, or Anthropic's `x-api-key` (its SDKs and Claude Code send
    the key there) as a Bearer token."""
    authorization = headers.get("authorization")
    if authorization is None and headers.get("x-api-key"):
        return f"Bearer {headers['x-api-key']}"
    return authorization


def _capture_json(ctx: RequestContext, body: bytes) -> None:
    try:
        doc = json.loads(body)
    except ValueError:
        return
    if not isinstance(doc, dict):
        return
    if isinstance(doc.get("usage"), dict):
        ctx.captured_usage = doc["usage"]
    error = doc.get("error")
    if isinstance(error, dict) and ctx.error_code is None:
        code = error.get("code") or error.get("type")
        ctx.error_code = str(code)[:64] if code else None


def _capture_sse_usage(ctx: RequestContext, chunk: bytes) -> None:
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage":{' in line:
            try:
                doc = json.loads(line[6:])
            except ValueError:
                continue
            if isinstance(doc.get("usage"), dict):
                ctx.captured_usage = doc["usage"]
