"""The platform: keys, limits and the ledger, behind one object the app and the CLI share."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from k2serve.api.errors import APIError
from k2serve.platform.db import Database, open_database, redact
from k2serve.platform.keys import KeyInfo, KeyStore
from k2serve.platform.ledger import LedgerRow, LedgerWriter, usage_totals
from k2serve.platform.pricing import cost_usd, pricing_for
from k2serve.platform.ratelimit import (
    WINDOW_S,
    Decision,
    MemoryRateLimiter,
    MemoryRetryStore,
    RedisRateLimiter,
    RedisRetryStore,
    run_soon,
)

log = logging.getLogger("k2serve.platform")
request_log = logging.getLogger("k2serve.requests")

MAX_RETRY_COUNT = 1000


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(eq=False)
class RequestContext:
    """One HTTP request as the platform sees it, from authentication to its ledger row."""

    request_id: str
    method: str
    path: str
    started_at: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    endpoint: str | None = None  # set for generation endpoints only
    key: KeyInfo | None = None
    model: str | None = None
    reserved: int = 0
    decision: Decision | None = None
    admitted_at: float | None = None
    retry_group: str | None = None
    retry_count: int = 0
    refused: bool = False
    status: int | None = None
    error_code: str | None = None
    captured_usage: dict | None = None
    tracker: object | None = None  # the UsageTracker of its generation, when one ran
    record: object | None = None  # ... and the UsageRecord it reported
    app_done: bool = False
    settled: bool = False
    refunded: bool = False


class Platform:
    def __init__(self, db: Database, *, host: str = "127.0.0.1", redis_url: str | None = None,
                 window_s: float = WINDOW_S):
        self.db = db
        self.keys = KeyStore(db)
        self.host = host
        self.loopback = is_loopback(host)
        self.redis_url = redis_url
        if redis_url:
            self.limiter = RedisRateLimiter(redis_url, window_s)
            self.retries = RedisRetryStore(self.limiter)
        else:
            self.limiter = MemoryRateLimiter(window_s)
            self.retries = MemoryRetryStore()
        self.writer = LedgerWriter(db)
        self.registry = None
        self._closed = False

    # -- wiring ------------------------------------------------------------------------
    def install(self, app) -> None:
        """Sinks, admin routes and state; create_app adds the middleware itself."""
        from k2serve.api.routes import admin

        self.registry = app.state.registry
        app.state.platform = self
        app.state.usage_sinks.append(self.ledger_sink)
        app.include_router(admin.router)

    def open_mode(self) -> bool:
        return self.loopback and not self.keys.any_key_exists()

    def startup_note(self) -> str:
        if self.open_mode():
            return ("auth: OPEN — no API key exists and the server listens on loopback, so "
                    "requests need no key (`k2serve keys create --name NAME` turns keys on)")
        if not self.keys.any_key_exists():
            return ("auth: API key required — but no key exists yet, so every request will be "
                    "refused: create one with `k2serve keys create --name NAME`")
        return "auth: API key required"

    def describe(self) -> str:
        limiter = f"redis {redact(self.redis_url)}" if self.redis_url else "in-memory"
        return f"database {redact(self.db.url)}, rate limits {limiter}"

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.sleep(0)  # let scheduled limiter settlements run
        await run_in_threadpool(self.writer.close)
        await self.limiter.aclose()

    def close(self) -> None:
        """Synchronous close, for callers without an event loop (tests, CLI)."""
        if not self._closed:
            self._closed = True
            self.writer.close()
        self.db.close()

    # -- authentication ------------------------------------------------------------------
    async def authenticate(self, authorization: str | None) -> KeyInfo | None:
        """The request's key; None in open mode. Raises 401."""
        token = None
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        info = await run_in_threadpool(self.keys.lookup, token) if token else None
        if info is not None and not info.revoked:
            return info
        if self.loopback and not await run_in_threadpool(self.keys.any_key_exists):
            return None  # open mode
        headers = {"www-authenticate": 'Bearer realm="k2serve"'}
        if info is not None:
            raise APIError(401, f"The API key '{info.prefix}' ({info.name}) has been revoked.",
                           code="invalid_api_key", headers=headers)
        if token is None:
            raise APIError(401, "Missing API key. Send it as 'Authorization: Bearer <key>' "
                                "(`k2serve keys create` makes one).",
                           code="missing_api_key", headers=headers)
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers=headers)

    # -- admission -------------------------------------------------------------------------
    async def admit(self, ctx: RequestContext, body: dict, raw: bytes, headers) -> None:
        """Model allow-list, budget, retry identity, reservation and rate limits.

        Raises APIError (403 / 429); otherwise the request holds its reservation."""
        key = ctx.key
        if key is not None and ctx.model is not None and not key.allows_model(ctx.model):
            raise APIError(403, f"The API key '{key.name}' may not use the model "
                                f"'{ctx.model}'. Allowed: {', '.join(key.allowed_models)}.",
                           param="model", code="model_not_allowed")
        if key is not None and key.budget_usd is not None and key.spent_usd >= key.budget_usd:
            raise APIError(429, f"The API key '{key.name}' has used its budget of "
                                f"${key.budget_usd:.6g} (spent ${key.spent_usd:.6g}).",
                           type="insufficient_quota", code="insufficient_quota",
                           headers={"x-should-retry": "false"})
        await self._retry_identity(ctx, raw, headers)
        # tokenizes the prompt: seconds for a large one, so off the event loop
        ctx.reserved = await run_in_threadpool(self.reservation, ctx.endpoint, body, raw)
        if key is not None and key.has_limits:
            decision = await self.limiter.acquire(key.id, key.rpm_limit, key.tpm_limit,
                                                  ctx.reserved)
            ctx.decision = decision
            if not decision.allowed:
                raise self._limited(key, decision, ctx.reserved, ctx.endpoint)
            ctx.admitted_at = decision.admitted_at
        else:
            ctx.admitted_at = time.time()

    @staticmethod
    def _limited(key: KeyInfo, d: Decision, reserved: int, endpoint: str | None) -> APIError:
        headers = d.headers()
        generates = endpoint in ("chat.completions", "completions")
        counted = "prompt + n x max_tokens" if generates else "its input"
        if d.reason == "too_large":
            headers["x-should-retry"] = "false"
            advice = "Lower max_tokens." if generates else "Send a smaller input."
            return APIError(429, f"This request reserves {reserved} tokens ({counted}), more "
                                 f"than the API key '{key.name}' may use in a minute ({d.tpm}). "
                                 f"{advice}", param="max_tokens" if generates else "input",
                            code="request_exceeds_token_limit", headers=headers)
        wait = headers.get("retry-after", "1")
        if d.reason == "requests":
            what = f"{d.rpm} requests per minute"
        else:
            what = (f"{d.tpm} tokens per minute; this request reserves {reserved} tokens "
                    f"({counted}) and {d.remaining_tokens} remain")
        return APIError(429, f"Rate limit reached for the API key '{key.name}': {what}. "
                             f"Retry in {wait} s.", code="rate_limit_exceeded", headers=headers)

    async def _retry_identity(self, ctx: RequestContext, raw: bytes, headers) -> None:
        """Which logical request this attempt belongs to (README: "Retries").

        - `Idempotency-Key: K`: every request of this key (or of open mode) with the same K.
        - else `x-stainless-retry-count: N` (N >= 1), as the OpenAI / Together SDKs send on
          their retries: the latest request of this key whose body was byte-identical and
          that itself carried the header (the SDK's first attempt sends 0), within 15 min.
        - else: a request of its own. Identical bodies sent without these headers are
          separate requests (sampling twice is legitimate) and are billed separately.
        """
        count = headers.get("x-stainless-retry-count")
        try:
            ctx.retry_count = max(0, min(int(count), MAX_RETRY_COUNT)) if count is not None else 0
        except ValueError:
            ctx.retry_count = 0
        scope_id = ctx.key.id if ctx.key is not None else "-"
        idem = headers.get("idempotency-key")
        if idem:
            ctx.retry_group = "i" + hashlib.sha256(
                f"{scope_id}\0{idem}".encode("utf-8", "surrogateescape")).hexdigest()[:31]
            return
        if count is None:
            ctx.retry_group = uuid.uuid4().hex
            return
        fingerprint = hashlib.sha256(scope_id.encode() + b"\0" + raw).hexdigest()
        group = await self.retries.get(fingerprint) if ctx.retry_count > 0 else None
        if group is None:
            group = uuid.uuid4().hex
            await self.retries.put(fingerprint, group)
        ctx.retry_group = group

    def reservation(self, endpoint: str | None, body: dict, raw: bytes) -> int:
        """Tokens to hold against TPM: prompt tokens + n x the most the request may generate.

        The prompt is tokenized with the model's own tokenizer (and chat template), so the
        reservation bounds what the request can really use."""
        try:
            return _reservation(self.registry, endpoint, body)
        except Exception:  # most likely the route will refuse this request too
            log.debug("reservation estimate failed; using an upper bound", exc_info=True)
            return _upper_bound(self.registry, body, raw)

    # -- the end of a request ----------------------------------------------------------------
    def ledger_sink(self, record) -> None:
        """Usage sink: called once per generation when it ends (see k2serve.api.usage)."""
        ctx = getattr(record.request_id, "k2serve_ctx", None)
        if ctx is None:  # a generation the middleware did not see
            self._submit_record(record)
            return
        if ctx.settled:
            log.warning("usage for request %s arrived after its ledger row was written from "
                        "the reply; %d completion tokens not billed", ctx.request_id,
                        record.completion_tokens)
            return
        ctx.record = record
        self._refund(ctx, record.prompt_tokens + record.completion_tokens)
        if ctx.app_done:
            self._finalize(ctx)

    def after_app(self, ctx: RequestContext) -> None:
        """Called by the middleware when the app has finished with the request."""
        ctx.app_done = True
        if ctx.endpoint is None or ctx.settled:
            return
        if ctx.record is None and ctx.tracker is not None:
            # The generation ran but its tracker has not reported: its stream was cancelled
            # (client gone) before the generator's own cleanup reached tracker.finish — an
            # anyio cancel scope cancels every await in a `finally` again. Finish it here:
            # the tracker counts the tokens that were produced and consumed. (finish() is
            # idempotent, so a cleanup that does get there later changes nothing.)
            gone = ctx.status is not None and (ctx.status < 500 or ctx.status == 499)
            ctx.tracker.finish("client_closed" if gone else "error",
                               None if gone else "the request ended before its generation")
            if ctx.settled:
                return
        self._finalize(ctx)

    def _refund(self, ctx: RequestContext, used: int) -> None:
        if ctx.refunded:
            return
        ctx.refunded = True
        d = ctx.decision
        if d is not None and d.entry_id is not None and ctx.key is not None:
            if used > ctx.reserved:
                log.warning("request %s used %d tokens, more than the %d reserved",
                            ctx.request_id, used, ctx.reserved)
            run_soon(self._settle_quietly(ctx.key.id, d.entry_id, used))

    async def _settle_quietly(self, key_id: str, entry_id: str, used: int) -> None:
        try:
            await self.limiter.settle(key_id, entry_id, used)
        except Exception:
            log.exception("rate limiter settle failed")

    def _finalize(self, ctx: RequestContext) -> None:
        if ctx.settled:
            return
        ctx.settled = True
        record = ctx.record
        if record is not None:
            prompt, cached, completion = (record.prompt_tokens, record.cached_tokens,
                                          record.completion_tokens)
            status, error = record.status, None
            if status == "error":
                error = ctx.error_code or "generation_error"
            elif status == "content_filter":  # the safety model's stage and labels
                error = record.error
            ttft, duration = record.ttft_s, record.duration_s
            model = record.model
        else:
            usage = ctx.captured_usage or {}
            prompt = _int(usage.get("prompt_tokens"))
            completion = _int(usage.get("completion_tokens"))
            cached = _int((usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
            if ctx.status is None:
                status = "client_closed" if not ctx.refused else "rejected"
            elif ctx.status < 400:
                status = "ok"
            elif ctx.status < 500 and ctx.status != 499:
                status = "rejected"
            else:
                status = "client_closed" if ctx.status == 499 else "error"
            error = ctx.error_code
            ttft, duration = None, time.perf_counter() - ctx.t0
            model = ctx.model
            self._refund(ctx, prompt + completion)
            _log_request(ctx, status)
        row = LedgerRow(
            request_id=str(ctx.request_id), api_key_id=ctx.key.id if ctx.key else None,
            model=model, endpoint=ctx.endpoint or "", status=status, started_at=ctx.started_at,
            prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion,
            cost_usd=cost_usd(pricing_for(self.registry, model), prompt, cached, completion),
            http_status=ctx.status, error=error, ttft_s=ttft, duration_s=duration,
            admitted_at=ctx.admitted_at, retry_group=ctx.retry_group,
            retry_count=ctx.retry_count)
        self.writer.submit(row)
        ctx.tracker = ctx.record = None  # the record's request id refers back to ctx

    def _submit_record(self, record) -> None:
        model = record.model
        self.writer.submit(LedgerRow(
            request_id=str(record.request_id), api_key_id=record.api_key_id, model=model,
            endpoint=record.endpoint, status=record.status, started_at=record.started_at,
            prompt_tokens=record.prompt_tokens, cached_tokens=record.cached_tokens,
            completion_tokens=record.completion_tokens,
            cost_usd=cost_usd(pricing_for(self.registry, model), record.prompt_tokens,
                              record.cached_tokens, record.completion_tokens),
            ttft_s=record.ttft_s, duration_s=record.duration_s))

    # -- reading -------------------------------------------------------------------------------
    def usage_totals(self, *, key_name: str | None = None, since: float | None = None) -> dict:
        self.writer.flush()
        return usage_totals(self.db, key_name=key_name, since=since)


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _reservation(registry, endpoint: str | None, body: dict) -> int:
    from k2serve.serving.text_backend import TextBackend

    model = body.get("model")
    entry = registry.get(model) if (registry is not None and isinstance(model, str)) else None
    if entry is not None and hasattr(entry[1], "reservation"):
        return entry[1].reservation(body)  # a backend that bounds its own requests' tokens
    if entry is None or not isinstance(entry[1], TextBackend):
        return 0  # the route answers 404 / 400
    backend: TextBackend = entry[1]
    context = backend.context_length
    n = body.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 16 else 1
    if endpoint == "completions":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return 0
        prompt_tokens = len(backend.encode_text_prompt(prompt))
        requested, default = body.get("max_tokens"), 16
    else:
        from k2serve.api.routes.chat import _render_prompt
        from k2serve.api.schemas.chat import ChatCompletionRequest

        req = ChatCompletionRequest.model_validate(body)
        prompt_tokens = len(backend.encode_chat_prompt(_render_prompt(req, backend)))
        requested, default = req.requested_max_tokens, None
    if body.get("context_length_exceeded_behavior") == "truncate":
        prompt_tokens = min(prompt_tokens, max(context - 1, 1))
    room = max(context - prompt_tokens, 0)
    if not isinstance(requested, int) or isinstance(requested, bool):
        completion = room if default is None else min(default, room)
    else:
        completion = min(max(requested, 0), room)
    return prompt_tokens + n * completion


def _upper_bound(registry, body: dict, raw: bytes) -> int:
    """A reservation without tokenizing: no prompt has more tokens than bytes (+ a template's
    worth), nor may it generate more than the model's context."""
    model = body.get("model")
    entry = registry.get(model) if (registry is not None and isinstance(model, str)) else None
    context = getattr(entry[1], "context_length", None) if entry else None
    n = body.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 16 else 1
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 0:
        requested = context or 4096
    if context:
        requested = min(requested, context)
    return len(raw) + 1024 + n * requested


def _log_request(ctx: RequestContext, status: str) -> None:
    """One structured line for a request that ran no generation (generations are logged by
    the usage tracker's own sink). No key, no body, no prompt."""
    if not request_log.isEnabledFor(logging.INFO):
        return
    request_log.info(json.dumps({
        "request_id": str(ctx.request_id), "method": ctx.method, "path": ctx.path,
        "endpoint": ctx.endpoint, "model": ctx.model, "status": status,
        "http_status": ctx.status, "error": ctx.error_code,
        "api_key_id": ctx.key.id if ctx.key else None,
        "duration_s": round(time.perf_counter() - ctx.t0, 6)}, separators=(",", ":")))


def open_platform(*, database_url: str | None = None, data_dir: str | None = None,
                  redis_url: str | None = None, host: str = "127.0.0.1",
                  window_s: float = WINDOW_S) -> Platform:
    """Open (and migrate) the database; check Redis answers. Raises RuntimeError with a
    message a user can act on."""
    import os

    redis_url = redis_url or os.environ.get("K2SERVE_REDIS_URL") or None
    try:
        db = open_database(database_url_arg=database_url, data_dir_arg=data_dir)
    except Exception as exc:
        raise RuntimeError(f"cannot open the database: {exc}") from exc
    if redis_url:
        try:
            import redis

            client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
            client.ping()
            client.close()
        except Exception as exc:
            db.close()
            raise RuntimeError(f"cannot reach Redis at {redact(redis_url)}: {exc}") from exc
    return Platform(db, host=host, redis_url=redis_url, window_s=window_s)
