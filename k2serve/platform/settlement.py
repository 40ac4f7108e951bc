"""Settlement: each generation's ledger row, from admission to its final usage.

The row is written `in_progress` before the app runs (a crash leaves it for the next server to
close as `interrupted`), updated with the tokens so far while the generation runs, and
settled once, with the request's real usage at its model's price: from the generation's
usage record, or, when none ran, from the reply's own `usage`. Settling gives the key's
unused TPM reservation back and releases its budget hold once the row is written.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.concurrency import run_in_threadpool

from k2serve.api.usage import UsageRecord, UsageTracker
from k2serve.errors import APIError
from k2serve.platform.context import RequestContext, log_request
from k2serve.platform.ledger import IN_PROGRESS, LedgerRow, LedgerWriter
from k2serve.platform.pricing import cost_usd, pricing_for
from k2serve.platform.ratelimit import (
    BudgetHolds,
    RateLimiter,
    run_soon,
)
from k2serve.platform.retries import RetryGuard
from k2serve.serving.registry import ModelRegistry
from k2serve.telemetry import tracing
from k2serve.telemetry.metrics import KEY_TOKENS

log = logging.getLogger("k2serve.platform")

LEDGER_WAIT_S = 10.0  # the longest a request waits for its ledger row to be committed


class Settlement:
    def __init__(self, writer: LedgerWriter, limiter: RateLimiter,
                 budgets: BudgetHolds, retries: RetryGuard):
        self.writer = writer
        self.limiter = limiter
        self.budgets = budgets
        self.retries = retries
        self.registry: ModelRegistry | None = None  # the app's, once installed
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._written_holds: list[tuple[str, str]] = []  # released once their rows are written
        self._releaser: asyncio.Task | None = None

    async def open_row(self, ctx: RequestContext) -> None:
        """Write the request's ledger row (`in_progress`) before the app runs, so that a
        crash at any later point leaves a row (the next server closes it as `interrupted`).
        Written by the ledger thread; raises 503 when it cannot be written."""
        self._loop = asyncio.get_running_loop()
        row = self._row(ctx, IN_PROGRESS, model=ctx.model)
        ctx.entry_id = await self.writer.write(row, timeout=LEDGER_WAIT_S)
        if ctx.entry_id is None:
            raise APIError(503, "The usage ledger could not be written, so the request was "
                                "not run. Retry shortly.", code="ledger_unavailable",
                           type="service_unavailable", headers={"retry-after": "1"})

    def observer(self, ctx: RequestContext) -> LedgerObserver:
        """The request's UsageObserver (k2serve.api.request_scope)."""
        return LedgerObserver(self, ctx)

    def progress(self, ctx: RequestContext, snapshot: UsageRecord) -> None:
        """A running generation's tokens so far, written to its row without waiting."""
        if ctx.entry_id is None or ctx.settled:
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
                with tracing.span("ledger write", **{"k2serve.ledger.status": row.status}):
                    await self.writer.write(row, ctx.entry_id, timeout=LEDGER_WAIT_S)
        elif final:  # a tracker that has not reported: its tokens so far
            await self.writer.write(self._record_row(ctx, ctx.tracker.snapshot(), IN_PROGRESS),
                                    ctx.entry_id, timeout=LEDGER_WAIT_S)

    # -- the end of a request ----------------------------------------------------------------
    def finished(self, ctx: RequestContext, record: UsageRecord) -> None:
        """The generation's final usage, once, when it ends."""
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
            run_soon(self.retries.close_slot(ctx, None))
        if ctx.endpoint is None or ctx.settled:
            return
        if ctx.detached and ctx.record is None:
            return  # a background generation: settled by `finished`, when it ends
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
            log_request(ctx, status)
        self._release_hold_after_write(ctx, row.cost_usd)
        if ctx.key is not None:  # its rate: the key's TPM as billed
            KEY_TOKENS.labels(ctx.key.name).inc(row.total_tokens)
        ctx.tracker = ctx.record = None  # a cycle: tracker -> its request scope -> observer -> ctx
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
            cost_usd=cost_usd(pricing_for(self.registry, model), prompt, cached, completion,
                              batch=ctx.batch_id is not None),
            http_status=ctx.status, error=error, ttft_s=ttft, duration_s=duration,
            admitted_at=ctx.admitted_at, retry_group=ctx.retry_group,
            retry_count=ctx.retry_count, batch_id=ctx.batch_id)

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
            if not self.closed:
                await run_in_threadpool(self.writer.flush)
            for key_id, hold in batch:
                try:
                    await self.budgets.release(key_id, hold)
                except Exception:
                    log.exception("releasing a budget hold failed (it expires by itself)")


class LedgerObserver:
    """A request's UsageObserver: its generation's usage goes to its ledger row."""

    def __init__(self, settlement: Settlement, ctx: RequestContext):
        self._settlement = settlement
        self._ctx = ctx

    def started(self, tracker: UsageTracker) -> None:
        self._ctx.tracker = tracker

    def progress(self, snapshot: UsageRecord) -> None:
        self._settlement.progress(self._ctx, snapshot)

    def finished(self, record: UsageRecord) -> None:
        self._settlement.finished(self._ctx, record)

    def detached(self) -> None:
        self._ctx.detached = True


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0

