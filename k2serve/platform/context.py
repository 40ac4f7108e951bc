"""One HTTP request as the platform sees it, from authentication to its ledger row."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from k2serve.platform.keys import KeyInfo
from k2serve.platform.ratelimit import Decision

if TYPE_CHECKING:
    from k2serve.api.request_scope import RequestScope
    from k2serve.api.usage import UsageRecord, UsageTracker

request_log = logging.getLogger("k2serve.requests")


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
    tracker: UsageTracker | None = None  # its generation's, when one ran
    scope: RequestScope | None = None  # what the layers tell the routes (k2serve.api)
    record: UsageRecord | None = None  # ... and the record it reported
    app_done: bool = False
    detached: bool = False  # its generation outlives the reply (a background response)
    settled: bool = False
    refunded: bool = False
    entry_id: int | None = None  # its ledger row, written at admission (Settlement.open_row)
    batch_id: str | None = None  # a batch line (k2serve.api.batch_runner): no rate limits


def log_request(ctx: RequestContext, status: str) -> None:
    """One structured line for a request that ran no generation (a generation's line is the
    usage tracker's, k2serve.api.usage.log_usage). No key, no body, no prompt."""
    if not request_log.isEnabledFor(logging.INFO):
        return
    request_log.info(json.dumps({
        "request_id": str(ctx.request_id), "method": ctx.method, "path": ctx.path,
        "endpoint": ctx.endpoint, "model": ctx.model, "status": status,
        "http_status": ctx.status, "error": ctx.error_code,
        "api_key_id": ctx.key.id if ctx.key else None,
        "duration_s": round(time.perf_counter() - ctx.t0, 6)}, separators=(",", ":")))

