"""The platform: keys, limits and the ledger, behind one object the app and the CLI share."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool

from k2serve.errors import APIError
from k2serve.platform.db import Database, open_database, redact
from k2serve.platform.keys import KeyInfo, KeyStore
from k2serve.platform.ledger import IN_PROGRESS, LedgerRow, LedgerWriter, usage_totals
from k2serve.platform.pricing import cost_usd, pricing_for
from k2serve.platform.ratelimit import (
    IDEMPOTENCY_TTL_S,
    RETRY_GROUP_TTL_S,
    WINDOW_S,
    Decision,
    MemoryBudgetHolds,
    MemoryRateLimiter,
    MemoryRetryStore,
    RedisBudgetHolds,
    RedisRateLimiter,
    RedisRetryStore,
    run_soon,
)

log = logging.getLogger("k2serve.platform")
request_log = logging.getLogger("k2serve.requests")

MAX_RETRY_COUNT = 1000
MAX_IDEMPOTENCY_KEY = 255  # characters, as Stripe
MAX_REPLAY_BYTES = 1 << 20  # a larger reply is not stored: its retry generates again
# Reply headers not stored for a replay (the replay gets its own).
_NOT_REPLAYED = frozenset({b"content-length", b"x-request-id", b"date", b"server",
                           b"set-cookie", b"transfer-encoding"})
LEDGER_WAIT_S = 10.0  # the longest a request waits for its ledger row to be committed


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _authority_host(authority: str) -> str:
    """The host of a Host header value: `localhost:8000` -> localhost, `[::1]:80` -> ::1."""
    authority = authority.strip()
    if authority.startswith("["):
        return authority[1:authority.find("]")] if "]" in authority else authority
    name, sep, port = authority.rpartition(":")
    return name if sep and ":" not in name and port.isdigit() else authority


def _origin_host(origin: str) -> str:
    try:  # `null` (a sandboxed frame, a file: page) has no host, so it is not loopback
        return urlsplit(origin.strip()).hostname or ""
    except ValueError:
        return ""


def check_open_mode_request(host: str | None, origin: str | None) -> None:
    """Open mode trusts the machine, not the network: a request must be addressed to a
    loopback name (a DNS-rebinding page reaches 127.0.0.1 under its own host name) and, when
    a browser sends one, come from a loopback Origin (a cross-site page can POST without
    reading the reply). Raises 403."""
    hint = "Create an API key (`k2serve keys create --name NAME`) to serve it with keys."
    if host is None or not is_loopback(_authority_host(host)):
        raise APIError(403, f"This server runs without API keys (open mode), so it answers only "
                            f"requests addressed to localhost, 127.0.0.1 or [::1], not to Host "
                            f"'{(host or '')[:100]}'. {hint}", code="host_not_allowed")
    if origin is not None and not is_loopback(_origin_host(origin)):
        raise APIError(403, f"This server runs without API keys (open mode), so it refuses "
                            f"browser requests from other sites (Origin '{origin[:100]}'). "
                            f"{hint}", code="origin_not_allowed")


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
    slot: str | None = None  # its claim in the retry store (README: "Retries")
    slot_token: str | None = None
    slot_ttl: float = 0.0
    replay: dict | None = None  # a stored reply to send instead of generating
    budget_hold: str | None = None  # its worst-case cost, held against the key's budget
    refused: bool = False
    status: int | None = None
    error_code: str | None = None
    captured_usage: dict | None = None
    tracker: object | None = None  # the UsageTracker of its generation, when one ran
    record: object | None = None  # ... and the UsageRecord it reported
    app_done: bool = False
    settled: bool = False
    refunded: bool = False
    entry_id: int | None = None  # its ledger row, written at admission (Platform.open_row)


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
            self.budgets = RedisBudgetHolds(self.limiter)
        else:
            self.limiter = MemoryRateLimiter(window_s)
            self.retries = MemoryRetryStore()
            self.budgets = MemoryBudgetHolds()
        self.writer = LedgerWriter(db)
        self.registry = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._written_holds: list[tuple[str, str]] = []  # released once their rows are written
        self._releaser: asyncio.Task | None = None

    # -- wiring ------------------------------------------------------------------------
    def install(self, app) -> None:
        """Sinks, admin routes and state; create_app adds the middleware itself."""
        from k2serve.platform import admin

        self.registry = app.state.registry
        app.state.platform = self
        app.state.usage_sinks.append(self.ledger_sink)
        if getattr(app.state, "usage_progress_sinks", None) is None:
            app.state.usage_progress_sinks = []
        app.state.usage_progress_sinks.append(self.ledger_progress)
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
    async def authenticate(self, authorization: str | None, host: str | None = None,
                           origin: str | None = None) -> KeyInfo | None:
        """The request's key; None in open mode, for a request with a loopback Host (and
        Origin, if any: check_open_mode_request). Raises 401, or 403 in open mode."""
        token = None
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        info = await run_in_threadpool(self.keys.lookup, token) if token else None
        if info is not None and not info.revoked:
            return info
        if self.loopback and not await run_in_threadpool(self.keys.any_key_exists):
            check_open_mode_request(host, origin)
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

        Raises APIError (403 / 409 / 422 / 429); otherwise the request holds its reservation,
        or `ctx.replay` is the stored reply of the same request, to send instead."""
        self._loop = asyncio.get_running_loop()
        key = ctx.key
        body = self._check_models(ctx, body)
        await self._retry_identity(ctx, raw, headers)
        if ctx.replay is not None:
            return  # nothing generated, nothing reserved: a spent budget does not matter
        try:
            if key is not None and key.budget_usd is not None and key.spent_usd >= key.budget_usd:
                raise self._over_budget(key, key.spent_usd, 0.0)
            # Tokenizing a long prompt takes a while: not on the event loop.
            prompt, completion = await run_in_threadpool(self.reservation_split, ctx.endpoint,
                                                         body, raw)
            ctx.reserved = prompt + completion
            if key is not None and key.budget_usd is not None:
                await self._hold_budget(ctx, key, prompt, completion)
            if key is not None and key.has_limits:
                decision = await self.limiter.acquire(key.id, key.rpm_limit, key.tpm_limit,
                                                      ctx.reserved)
                ctx.decision = decision
                if not decision.allowed:
                    raise self._limited(key, decision, ctx.reserved, ctx.endpoint)
                ctx.admitted_at = decision.admitted_at
            else:
                ctx.admitted_at = time.time()
        except Exception:  # refused: give back the claim and the hold now
            await self._close_slot(ctx, None)
            await self._release_hold(ctx)
            raise
        except BaseException:  # cancelled (client gone): the same, outside the cancel scope
            run_soon(self._close_slot(ctx, None))
            run_soon(self._release_hold(ctx))
            raise

    def _check_models(self, ctx: RequestContext, body: dict) -> dict:
        """The key's allow-list, for every model the request would use: `model` (or, when it
        names none, the one the route would pick) and `safety_model`. Returns the body with
        that model filled in, for the reservation."""
        model = body.get("model")
        if model is None or (model == "" and (ctx.endpoint or "").startswith("audio.")):
            default = _default_model(self.registry, ctx.endpoint)
            if default is not None:
                ctx.model = default
                body = dict(body, model=default)
                model = default
        key = ctx.key
        if key is None or key.allowed_models is None:
            return body
        for param, name in (("model", model), ("safety_model", body.get("safety_model"))):
            if isinstance(name, str) and not key.allows_model(name):
                raise APIError(403, f"The API key '{key.name}' may not use the model "
                                    f"'{name[:256]}'. Allowed: {', '.join(key.allowed_models)}.",
                               param=param, code="model_not_allowed")
        return body

    @staticmethod
    def _over_budget(key: KeyInfo, spent: float, held: float) -> APIError:
        if spent >= key.budget_usd:  # spent: retrying will not help
            return APIError(429, f"The API key '{key.name}' has used its budget of "
                                 f"${key.budget_usd:.6g} (spent ${spent:.6g}).",
                            type="insufficient_quota", code="insufficient_quota",
                            headers={"x-should-retry": "false"})
        return APIError(429, f"The API key '{key.name}' has reached its budget of "
                             f"${key.budget_usd:.6g}: spent ${spent:.6g}, and ${held:.6g} is "
                             f"held by its requests in progress (their worst-case cost). "
                             f"Retry when they have finished.",
                        type="insufficient_quota", code="insufficient_quota",
                        headers={"retry-after": "1"})

    async def _hold_budget(self, ctx: RequestContext, key: KeyInfo, prompt: int,
                           completion: int) -> None:
        """Hold the request's worst-case cost (prompt + n x max_tokens at the model's prices)
        until its ledger row is written, and admit it only if the key's spend plus the holds
        of its other requests leave some budget. So at most one request (the last admitted)
        can take the key past its budget, by at most its own cost.

        The spend is read AFTER the holds: a request that finishes in between is counted in
        the holds (released only once its row is written) or in the spend, never neither."""
        worst = cost_usd(pricing_for(self.registry, ctx.model), prompt, 0, completion)
        ctx.budget_hold, held = await self.budgets.hold(key.id, worst)
        spent = await run_in_threadpool(self.keys.spent_usd, key.id)
        if spent + held >= key.budget_usd:
            raise self._over_budget(key, spent, held)

    async def _release_hold(self, ctx: RequestContext) -> None:
        hold, ctx.budget_hold = ctx.budget_hold, None
        if hold is not None and ctx.key is not None:
            try:
                await self.budgets.release(ctx.key.id, hold)
            except Exception:
                log.exception("releasing a budget hold failed (it expires by itself)")

    def _release_hold_after_write(self, ctx: RequestContext, cost: float) -> None:
        """The row with the request's real cost is queued: hold just that cost now, and
        release the hold once the ledger writer has written the row (a flush), so the key's
        spend counts it first."""
        hold, ctx.budget_hold = ctx.budget_hold, None
        if hold is None or ctx.key is None:
            return
        item = (ctx.key.id, hold)

        def queue() -> None:
            run_soon(self._settle_hold(item, cost))
            self._written_holds.append(item)
            if self._releaser is None or self._releaser.done():
                self._releaser = run_soon(self._release_written())

        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            queue()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(queue)

    async def _settle_hold(self, item: tuple[str, str], cost: float) -> None:
        try:
            await self.budgets.settle(*item, cost)
        except Exception:
            log.exception("settling a budget hold failed")

    async def _release_written(self) -> None:
        while self._written_holds:
            batch, self._written_holds = self._written_holds, []
            if not self._closed:
                await run_in_threadpool(self.writer.flush)
            for key_id, hold in batch:
                try:
                    await self.budgets.release(key_id, hold)
                except Exception:
                    log.exception("releasing a budget hold failed (it expires by itself)")

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

        - `Idempotency-Key: K`: the request of this key (or of open mode) that first sent K.
          The same body on the same endpoint again: its stored reply is replayed once it has
          completed (409 while it runs); another body: 422. A first attempt that ended
          without a reply to replay (an error, a stream, a drop) lets the next one generate.
        - else `x-stainless-retry-count: N` (N >= 1), as the OpenAI / Together SDKs send on
          their retries: the latest request of this key with a byte-identical body that
          itself carried the header (the SDK's first attempt sends 0), within 15 min: its
          stored reply is replayed if it completed; if not, the retry generates again.
        - else: a request of its own. Identical bodies sent without these headers are
          separate requests (sampling twice is legitimate).
        Every attempt that generates is billed for what it generated; a replay for nothing.
        """
        count = headers.get("x-stainless-retry-count")
        try:
            ctx.retry_count = max(0, min(int(count), MAX_RETRY_COUNT)) if count is not None else 0
        except ValueError:
            ctx.retry_count = 0
        scope_id = ctx.key.id if ctx.key is not None else "-"
        idem = headers.get("idempotency-key")
        if not idem and count is None:
            ctx.retry_group = uuid.uuid4().hex
            return
        body_hash = _body_hash(ctx.endpoint, raw, headers.get("content-type", ""))
        if idem:
            if len(idem) > MAX_IDEMPOTENCY_KEY:
                raise APIError(400, f"The Idempotency-Key header has {len(idem)} characters; at "
                                    f"most {MAX_IDEMPOTENCY_KEY} are allowed.",
                               code="invalid_idempotency_key")
            slot = "i" + _digest(f"{scope_id}\0{idem}".encode("utf-8", "surrogateescape"))
            mode, group, ttl = "idem", slot, IDEMPOTENCY_TTL_S
        else:
            slot = "f" + _digest(f"{scope_id}\0{body_hash}".encode())
            mode = "retry" if ctx.retry_count > 0 else "first"
            group, ttl = uuid.uuid4().hex, RETRY_GROUP_TTL_S
        claim = await self.retries.claim(slot, body_hash, mode, group, ttl)
        if claim.outcome == "mismatch":
            raise APIError(422, "This Idempotency-Key was already used with a different request "
                                "(another body or endpoint). Use a new key for a new request.",
                           code="idempotency_key_reused")
        if claim.outcome == "conflict":
            raise APIError(409, "A request with this Idempotency-Key is still in progress. Retry "
                                "when it has finished: its reply is then replayed.",
                           code="idempotency_key_in_use", type="invalid_request_error",
                           headers={"retry-after": "1"})
        ctx.retry_group = claim.group
        if claim.outcome == "replay":
            ctx.replay = claim.response
            return
        ctx.slot, ctx.slot_token, ctx.slot_ttl = slot, claim.token, ttl

    def recording_sender(self, ctx: RequestContext, send):
        """Wraps the reply's `send` for a request with a claim: before its final byte, store a
        complete 200 reply that is not a stream (up to MAX_REPLAY_BYTES) for replay, or free
        the claim, so that a retry sent once the client has the reply finds it settled."""
        state = {"keep": False, "buf": bytearray(), "status": 200, "headers": []}

        async def sender(message):
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                state["status"] = message["status"]
                state["keep"] = (message["status"] == 200
                                 and not ctype.startswith(b"text/event-stream"))
                state["headers"] = [(k.decode("latin-1"), v.decode("latin-1"))
                                    for k, v in headers if k.lower() not in _NOT_REPLAYED]
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if state["keep"]:
                    if len(state["buf"]) + len(chunk) > MAX_REPLAY_BYTES:
                        state["keep"], state["buf"] = False, bytearray()
                    else:
                        state["buf"] += chunk
                if not message.get("more_body", False):
                    stored = None
                    if state["keep"]:
                        stored = {"status": state["status"], "headers": state["headers"],
                                  "body": base64.b64encode(bytes(state["buf"])).decode(),
                                  "request_id": ctx.request_id}
                    await self._close_slot(ctx, stored)
            await send(message)

        return sender

    async def send_replay(self, ctx: RequestContext, send) -> None:
        """Send a stored reply (marked `idempotent-replayed: true`, with the request id of the
        request that generated it); its ledger row has no tokens and status `replayed`."""
        stored = ctx.replay
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in stored["headers"]]
        body = base64.b64decode(stored["body"])
        headers += [(b"content-length", str(len(body)).encode()),
                    (b"idempotent-replayed", b"true"),
                    (b"original-request-id", str(stored.get("request_id", "")).encode("latin-1"))]
        key = ctx.key
        if key is not None and key.has_limits:  # as on every reply to a limited key
            peek = await self.limiter.peek(key.id, key.rpm_limit, key.tpm_limit)
            headers += [(k.encode(), v.encode()) for k, v in peek.headers().items()]
        ctx.status = stored["status"]
        await send({"type": "http.response.start", "status": stored["status"], "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _close_slot(self, ctx: RequestContext, stored: dict | None) -> None:
        slot, ctx.slot = ctx.slot, None
        if slot is None:
            return
        try:
            await self.retries.finish(slot, ctx.slot_token, stored, ctx.slot_ttl)
        except Exception:
            log.exception("closing a retry claim failed (it expires by itself)")

    def reservation(self, endpoint: str | None, body: dict, raw: bytes) -> int:
        """Tokens to hold against TPM: prompt tokens + n x the most the request may generate."""
        return sum(self.reservation_split(endpoint, body, raw))

    def reservation_split(self, endpoint: str | None, body: dict, raw: bytes) -> tuple[int, int]:
        """(prompt tokens, n x the most the request may generate), for TPM and budgets.

        The prompt is tokenized with the model's own tokenizer (and chat template), so the
        reservation bounds what the request can really use."""
        try:
            return _reservation(self.registry, endpoint, body)
        except (APIError, ValueError):  # an invalid request: the route will refuse it too
            log.debug("reservation of an invalid request: using an upper bound", exc_info=True)
            return _upper_bound(self.registry, body, raw)
        except Exception:  # a bug here must not hide behind the upper bound (it did once)
            log.warning("reservation estimate failed; using an upper bound", exc_info=True)
            return _upper_bound(self.registry, body, raw)

    # -- the ledger row of a request --------------------------------------------------------
    async def open_row(self, ctx: RequestContext) -> None:
        """Write the request's ledger row (`in_progress`) before the app runs, so that a
        crash at any later point leaves a row (the next server closes it as `interrupted`).
        Written by the ledger thread; raises 503 when it cannot be written."""
        row = self._row(ctx, IN_PROGRESS, model=ctx.model)
        ctx.entry_id = await self.writer.write(row, timeout=LEDGER_WAIT_S)
        if ctx.entry_id is None:
            raise APIError(503, "The usage ledger could not be written, so the request was "
                                "not run. Retry shortly.", code="ledger_unavailable",
                           type="service_unavailable", headers={"retry-after": "1"})

    def ledger_progress(self, snapshot) -> None:
        """Usage progress sink (see k2serve.api.usage): a running generation's tokens so
        far, written to its row without waiting."""
        ctx = getattr(snapshot.request_id, "k2serve_ctx", None)
        if ctx is None or ctx.entry_id is None or ctx.settled:
            return
        self.writer.submit(self._record_row(ctx, snapshot, IN_PROGRESS), ctx.entry_id)

    async def before_body(self, ctx: RequestContext, final: bool) -> None:
        """Called by the middleware before each body message of a generation's reply: once
        the generation has reported (all its tokens are known), and before the reply's last
        message in any case, the row is committed before the bytes leave."""
        if ctx.entry_id is None or ctx.settled:
            return
        if ctx.record is not None or (final and ctx.tracker is None):
            row = self._settle(ctx)
            if row is not None:
                await self.writer.write(row, ctx.entry_id, timeout=LEDGER_WAIT_S)
        elif final:  # a tracker that has not reported: its tokens so far
            await self.writer.write(self._record_row(ctx, ctx.tracker.snapshot(), IN_PROGRESS),
                                    ctx.entry_id, timeout=LEDGER_WAIT_S)

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
        if ctx.slot is not None:  # no final byte was sent (an exception, a drop)
            run_soon(self._close_slot(ctx, None))
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
        """Queue the request's final row (no wait: the reply has gone, or never will)."""
        row = self._settle(ctx)
        if row is not None:
            self.writer.submit(row, ctx.entry_id)

    def _settle(self, ctx: RequestContext) -> LedgerRow | None:
        """The request's final row, once (None if already settled)."""
        if ctx.settled:
            return None
        ctx.settled = True
        record = ctx.record
        if record is not None:
            status, error = record.status, None
            if status == "error":
                error = ctx.error_code or "generation_error"
            elif status == "content_filter":  # the safety model's stage and labels
                error = record.error
            row = self._record_row(ctx, record, status, error)
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
            if ctx.replay is not None:  # a stored reply sent again: nothing generated
                prompt = completion = cached = 0
                status = "replayed" if status == "ok" else status
            row = self._row(ctx, status, model=ctx.model, prompt=prompt, cached=cached,
                            completion=completion, error=ctx.error_code,
                            duration=time.perf_counter() - ctx.t0)
            self._refund(ctx, prompt + completion)
            _log_request(ctx, status)
        self._release_hold_after_write(ctx, row.cost_usd)
        ctx.tracker = ctx.record = None  # the record's request id refers back to ctx
        return row

    def _record_row(self, ctx: RequestContext, record, status: str,
                    error: str | None = None) -> LedgerRow:
        return self._row(ctx, status, model=record.model, prompt=record.prompt_tokens,
                         cached=record.cached_tokens, completion=record.completion_tokens,
                         error=error, ttft=record.ttft_s, duration=record.duration_s)

    def _row(self, ctx: RequestContext, status: str, *, model, prompt: int = 0,
             cached: int = 0, completion: int = 0, error: str | None = None,
             ttft: float | None = None, duration: float | None = None) -> LedgerRow:
        return LedgerRow(
            request_id=str(ctx.request_id), api_key_id=ctx.key.id if ctx.key else None,
            model=model, endpoint=ctx.endpoint or "", status=status, started_at=ctx.started_at,
            prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion,
            cost_usd=cost_usd(pricing_for(self.registry, model), prompt, cached, completion),
            http_status=ctx.status, error=error, ttft_s=ttft, duration_s=duration,
            admitted_at=ctx.admitted_at, retry_group=ctx.retry_group,
            retry_count=ctx.retry_count)

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


def _reservation(registry, endpoint: str | None, body: dict) -> tuple[int, int]:
    from k2serve.serving.text_backend import TextBackend

    model = body.get("model")
    entry = registry.get(model) if (registry is not None and isinstance(model, str)) else None
    if entry is not None and hasattr(entry[1], "reservation"):
        # A backend that bounds its own requests' tokens (all billed as input).
        return entry[1].reservation(body), 0
    if entry is None or not isinstance(entry[1], TextBackend):
        return 0, 0  # the route answers 404 / 400
    backend: TextBackend = entry[1]
    context = backend.context_length
    n = body.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 16 else 1
    if endpoint == "completions":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return 0, 0
        prompt_tokens = len(backend.encode_text_prompt(prompt))
        requested, default = body.get("max_tokens"), 16
    else:
        from k2serve.api.routes.chat import _render_prompt
        from k2serve.api.schemas.chat import ChatCompletionRequest
        from k2serve.api.tools import plan_tools

        req = ChatCompletionRequest.model_validate(body)  # the prompt exactly as the route renders it
        prompt = _render_prompt(req, backend, plan_tools(req, backend))
        prompt_tokens = len(backend.encode_chat_prompt(prompt))
        requested, default = req.requested_max_tokens, None
    if body.get("context_length_exceeded_behavior") == "truncate":
        prompt_tokens = min(prompt_tokens, max(context - 1, 1))
    room = max(context - prompt_tokens, 0)
    if not isinstance(requested, int) or isinstance(requested, bool):
        completion = room if default is None else min(default, room)
    else:
        completion = min(max(requested, 0), room)
    return prompt_tokens, n * completion


def _upper_bound(registry, body: dict, raw: bytes) -> tuple[int, int]:
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
    return len(raw) + 1024, n * requested


def _default_model(registry, endpoint: str | None) -> str | None:
    """The model a route uses when the request names none (so the allow-list checks it):
    moderations, the first moderation model; audio, the one model of that kind, if one."""
    if registry is None:
        return None
    if endpoint == "moderations":
        return next((s.id for s in registry.specs() if s.type == "moderation"), None)
    if endpoint not in ("audio.speech", "audio.transcribe", "audio.translate"):
        return None
    try:
        from k2serve.audio.serving import SpeechBackend, TranscriptionBackend
    except ImportError:
        return None
    kind = SpeechBackend if endpoint == "audio.speech" else TranscriptionBackend
    found = [s.id for s in registry.specs() if isinstance(registry.get(s.id)[1], kind)]
    return found[0] if len(found) == 1 else None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:31]


def _body_hash(endpoint: str | None, raw: bytes, content_type: str) -> str:
    """What makes two attempts the same request: the endpoint and the body's bytes. A
    multipart body's boundary is random per attempt (an SDK's retry draws a new one), so it
    is left out."""
    if content_type.startswith("multipart/"):
        boundary = content_type.partition("boundary=")[2].split(";")[0].strip().strip('"')
        if boundary:
            raw = raw.replace(boundary.encode("latin-1", "replace"), b"")
    return hashlib.sha256(f"{endpoint}\0".encode() + raw).hexdigest()


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
