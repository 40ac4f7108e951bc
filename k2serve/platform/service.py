"""The platform: keys, limits and the ledger, behind one object the app and the CLI share.

Each job has its module: who is calling (auth), whether a request may run and what it holds
(admission, with retries), and what it is billed (settlement). `Platform` builds them over
one database and one rate-limit store, and is what the middleware calls.
"""

from __future__ import annotations

import asyncio
import logging
import os

from starlette.concurrency import run_in_threadpool

from k2serve.api.batch_store import FileBlobs
from k2serve.api.media_links import MediaFiles
from k2serve.api.responses_request import with_history
from k2serve.errors import APIError
from k2serve.platform.admission import Admission
from k2serve.platform.auth import Authenticator
from k2serve.platform.batch_store import DatabaseBatchStore
from k2serve.platform.context import RequestContext
from k2serve.platform.db import Database, open_database, redact
from k2serve.platform.db import data_dir as data_directory
from k2serve.platform.endpoint_billing import endpoint_usage_totals
from k2serve.platform.keys import KeyInfo, KeyStore
from k2serve.platform.ledger import LedgerRow, LedgerWriter, usage_by_day, usage_totals
from k2serve.platform.pricing import cost_usd, pricing_for
from k2serve.platform.ratelimit import (
    WINDOW_S,
    MemoryBudgetHolds,
    MemoryRateLimiter,
    MemoryRetryStore,
    RedisBudgetHolds,
    RedisRateLimiter,
    RedisRetryStore,
)
from k2serve.platform.response_store import DatabaseResponseStore
from k2serve.platform.retries import RetryGuard
from k2serve.platform.settlement import LedgerObserver, Settlement
from k2serve.platform.video_store import DatabaseVideoStore

log = logging.getLogger("k2serve.platform")


class Platform:
    def __init__(self, db: Database, *, host: str = "127.0.0.1", redis_url: str | None = None,
                 window_s: float = WINDOW_S, files_dir: str | os.PathLike | None = None,
                 media_dir: str | os.PathLike | None = None):
        self.db = db
        self.keys = KeyStore(db)
        self.redis_url = redis_url
        if redis_url:
            self.limiter = RedisRateLimiter(redis_url, window_s)
            store = RedisRetryStore(self.limiter)
            self.budgets = RedisBudgetHolds(self.limiter)
        else:
            self.limiter = MemoryRateLimiter(window_s)
            store = MemoryRetryStore()
            self.budgets = MemoryBudgetHolds()
        self.writer = LedgerWriter(db)
        self.auth = Authenticator(self.keys, host)
        self.retries = RetryGuard(store, self.limiter)
        self.admission = Admission(self.keys, self.limiter, self.budgets, self.retries)
        self.settlement = Settlement(self.writer, self.limiter, self.budgets, self.retries)
        self.responses = DatabaseResponseStore(db)
        self.batches = DatabaseBatchStore(db)
        self.videos = DatabaseVideoStore(db)
        self.file_blobs = FileBlobs(files_dir)  # None: a temporary directory
        self.media_files = MediaFiles(media_dir)  # generated images and videos; the same
        self.endpoints = None  # the EndpointManager, under `k2serve serve --ray`
        self._closed = False

    # -- wiring ------------------------------------------------------------------------
    def install(self, app) -> None:
        """The registry, the admin routes; create_app adds the middleware itself."""
        from k2serve.platform import (
            admin,
            endpoints_routes,
            endpoints_v2_routes,
            usage_routes,
        )

        self.admission.registry = self.settlement.registry = app.state.registry
        app.state.platform = self
        app.state.endpoints = self.endpoints
        app.state.response_store = self.responses
        app.state.batch_store = self.batches
        app.state.video_store = self.videos
        app.state.bill_detached = self.bill_detached
        app.state.file_blobs = self.file_blobs
        app.state.media_files = self.media_files
        app.state.metrics_sources.append(self.live_metrics)
        app.include_router(admin.router)
        app.include_router(usage_routes.router)
        app.include_router(endpoints_routes.router)
        app.include_router(endpoints_v2_routes.router)

    def live_metrics(self):
        """The ledger's backlog, read when /metrics is scraped."""
        from prometheus_client.core import GaugeMetricFamily

        count, oldest = self.writer.backlog()
        pending = GaugeMetricFamily("k2serve:ledger_pending_writes",
                                    "Ledger writes queued, not committed yet.")
        pending.add_metric([], count)
        age = GaugeMetricFamily("k2serve:ledger_oldest_pending_seconds",
                                "How long the oldest uncommitted ledger write has waited.")
        age.add_metric([], oldest)
        yield pending
        yield age

    def open_mode(self) -> bool:
        return self.auth.open_mode()

    def startup_note(self) -> str:
        return self.auth.startup_note()

    def describe(self) -> str:
        limiter = f"redis {redact(self.redis_url)}" if self.redis_url else "in-memory"
        return f"database {redact(self.db.url)}, rate limits {limiter}"

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = self.settlement.closed = True
        if self.endpoints is not None:  # bills the replica time metered so far
            await run_in_threadpool(self.endpoints.close)
        await asyncio.sleep(0)  # let scheduled limiter settlements run
        await run_in_threadpool(self.writer.close)
        await self.limiter.aclose()

    def close(self) -> None:
        """Synchronous close, for callers without an event loop (tests, CLI)."""
        if not self._closed:
            self._closed = self.settlement.closed = True
            if self.endpoints is not None:
                self.endpoints.close()
            self.writer.close()
        self.db.close()

    # -- one request, in the order the middleware calls these ----------------------------
    async def authenticate(self, authorization: str | None, host: str | None = None,
                           origin: str | None = None) -> KeyInfo | None:
        return await self.auth.authenticate(authorization, host, origin)

    async def batch_caller(self, key_id: str | None) -> KeyInfo | None:
        """The key a batch line runs as: its batch's (None: made in open mode)."""
        if key_id is None:
            return None
        key = await run_in_threadpool(self.keys.get, key_id)
        if key is None or key.revoked:
            raise APIError(401, "The API key that created this batch has been revoked.",
                           code="invalid_api_key", type="invalid_request_error")
        return key

    async def rate_limit_headers(self, key: KeyInfo | None) -> dict[str, str]:
        """The key's rate-limit headers, for a reply that reserved nothing."""
        if key is None or not key.has_limits:
            return {}
        return (await self.limiter.peek(key.id, key.rpm_limit, key.tpm_limit)).headers()

    async def admit(self, ctx: RequestContext, body: dict, raw: bytes, headers) -> None:
        if ctx.endpoint == "responses" and body.get("previous_response_id"):
            # reserve the whole conversation the route will run, stored history included
            body = await run_in_threadpool(self._with_history, body, ctx.key)
        await self.admission.admit(ctx, body, raw, headers)

    def _with_history(self, body: dict, key: KeyInfo | None) -> dict:
        previous_id = body["previous_response_id"]
        record = self.responses.load(previous_id, key.id if key else None) \
            if isinstance(previous_id, str) and len(previous_id) <= 64 else None
        if record is None:
            return body  # the route answers 404
        try:
            return with_history(body, record.items, record.response.get("output") or [])
        except APIError:
            return body  # invalid input: the route answers 400

    async def open_row(self, ctx: RequestContext) -> LedgerObserver:
        """Write the request's `in_progress` ledger row; the observer its generation reports
        its usage to."""
        await self.settlement.open_row(ctx)
        return self.settlement.observer(ctx)

    async def send_replay(self, ctx: RequestContext, send) -> None:
        await self.retries.send_replay(ctx, send)

    def recording_sender(self, ctx: RequestContext, send):
        return self.retries.recording_sender(ctx, send)

    async def before_body(self, ctx: RequestContext, final: bool) -> None:
        await self.settlement.before_body(ctx, final)

    def after_app(self, ctx: RequestContext) -> None:
        self.settlement.after_app(ctx)

    def bill_detached(self, record, key_id: str | None) -> None:
        """A ledger row of its own for work that no request is waiting on any more: a video
        job run again after a restart (its request's row was closed as `interrupted`)."""
        self.writer.submit(LedgerRow(
            request_id=record.request_id, api_key_id=key_id, model=record.model,
            endpoint=record.endpoint, status=record.status, started_at=record.started_at,
            prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
            cost_usd=cost_usd(pricing_for(self.settlement.registry, record.model),
                              record.prompt_tokens, 0, record.completion_tokens),
            http_status=200, error=record.error and record.error[:64],
            duration_s=record.duration_s))

    def reservation(self, endpoint: str | None, body: dict, raw: bytes) -> int:
        """Tokens to hold against TPM: prompt tokens + n x the most the request may generate."""
        return sum(self.admission.usage_bound(endpoint, body, raw))

    # -- reading -------------------------------------------------------------------------------
    def usage_totals(self, *, key_name: str | None = None, since: float | None = None) -> dict:
        self.writer.flush()
        totals = usage_totals(self.db, key_name=key_name, since=since)
        totals["dedicated"] = endpoint_usage_totals(self.db, key_name=key_name, since=since)
        return totals

    def usage_by_day(self, *, key: KeyInfo | None = None, key_name: str | None = None,
                     every_key: bool = False, since: float | None = None) -> list[dict]:
        """Per day and model: the caller's own (`key`; None: open mode's), a named key's, or
        every key's. Raises LookupError for an unknown `key_name`."""
        self.writer.flush()
        if key_name is not None:
            key = self.keys.get_by_name(key_name)
            if key is None:
                raise LookupError(f"no key named {key_name!r}")
        return usage_by_day(self.db, key_id=key.id if key else None, every_key=every_key,
                            since=since)


def open_platform(*, database_url: str | None = None, data_dir: str | None = None,
                  redis_url: str | None = None, host: str = "127.0.0.1",
                  window_s: float = WINDOW_S, files_url: str | None = None) -> Platform:
    """Open (and migrate) the database; check Redis answers. Raises RuntimeError with a
    message a user can act on."""
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
    files_url = files_url or os.environ.get("K2SERVE_FILES_URL") or None
    blobs = None
    if files_url:  # checked now: a missing bucket fails start-up, not the first upload
        from k2serve.api.s3_blobs import open_file_blobs

        try:
            blobs = open_file_blobs(files_url)
        except RuntimeError:
            db.close()
            raise
    platform = Platform(db, host=host, redis_url=redis_url, window_s=window_s,
                        files_dir=data_directory(data_dir) / "files",
                        media_dir=data_directory(data_dir) / "media")
    if blobs is not None:
        platform.file_blobs = blobs
    return platform
