"""The usage ledger: one row per request, written by a background thread in small batches.

Billing rule (see README, "Retries"): every row that used tokens is billed, with the tokens
it really used — retries included, so every token delivered is billed. The attempts of one
logical request share a `retry_group` (for the record); a retry of a request that completed
is answered with its stored reply and leaves a `replayed` row with no tokens. Totals,
budgets and `spent_usd` count billed rows.

Each row is applied in one transaction that also moves the key's `spent_usd`; on PostgreSQL
the key's row is locked first (SELECT ... FOR UPDATE) and on SQLite the transaction takes
the write lock at BEGIN.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from sqlalchemy import case, func, select, update

from k2serve.platform.db import Database
from k2serve.platform.models import ApiKey, UsageEntry

log = logging.getLogger("k2serve.platform.ledger")


@dataclass
class LedgerRow:
    request_id: str
    api_key_id: str | None
    model: str | None
    endpoint: str
    status: str
    started_at: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    http_status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    duration_s: float | None = None
    admitted_at: float | None = None
    retry_group: str | None = None
    retry_count: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _eligible(prompt_tokens, completion_tokens):
    """Rows that can be billed: those that used tokens (a refusal never did)."""
    return (prompt_tokens + completion_tokens) > 0


def apply_row(session, row: LedgerRow) -> UsageEntry:
    """Insert one row (billed when it used tokens) and move the key's spend."""
    if row.api_key_id is not None:
        session.execute(select(ApiKey.id).where(ApiKey.id == row.api_key_id).with_for_update())
    entry = UsageEntry(
        request_id=str(row.request_id)[:128], api_key_id=row.api_key_id,
        model=(row.model or None) and str(row.model)[:256], endpoint=row.endpoint,
        prompt_tokens=row.prompt_tokens, cached_tokens=row.cached_tokens,
        completion_tokens=row.completion_tokens, cost_usd=row.cost_usd, status=row.status,
        http_status=row.http_status, error=(row.error or None) and str(row.error)[:64],
        ttft_s=row.ttft_s, duration_s=row.duration_s, started_at=row.started_at,
        admitted_at=row.admitted_at, retry_group=row.retry_group, retry_count=row.retry_count,
        billed=False)
    session.add(entry)
    session.flush()
    # Every attempt is billed for the tokens it used, retries included: an attempt that
    # generates again delivers its tokens again (a completed one is replayed instead, unbilled).
    delta = 0.0
    if _eligible(row.prompt_tokens, row.completion_tokens):
        entry.billed = True
        delta = row.cost_usd
    if row.api_key_id is not None:
        last = ApiKey.last_used_at
        session.execute(update(ApiKey).where(ApiKey.id == row.api_key_id).values(
            spent_usd=ApiKey.spent_usd + delta,
            last_used_at=case((last.is_(None) | (last < row.started_at), row.started_at),
                              else_=last)))
    return entry


class LedgerWriter:
    """Rows go on a queue; one thread writes them, a batch at a time, and never drops one:
    a failed write is retried (and logged) until it lands or the writer is closed."""

    BATCH = 200

    def __init__(self, db: Database):
        self.db = db
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="k2serve-ledger", daemon=True)
        self._thread.start()
        self.written = 0

    def submit(self, row: LedgerRow) -> None:
        self._queue.put(row)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every row submitted so far is in the database."""
        marker = threading.Event()
        self._queue.put(marker)
        return marker.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            items = [self._queue.get()]
            while len(items) < self.BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [i for i in items if isinstance(i, LedgerRow)]
            markers = [i for i in items if isinstance(i, threading.Event)]
            stop = any(i is None for i in items)
            if rows:
                self._write(rows)
            for m in markers:
                m.set()

    def _write(self, rows: list[LedgerRow]) -> None:
        delay = 0.05
        while True:
            try:
                with self.db.write() as session:
                    for row in rows:
                        apply_row(session, row)
                self.written += len(rows)
                return
            except Exception:
                if len(rows) > 1:  # find the bad row rather than hold the good ones back
                    for row in rows:
                        self._write([row])
                    return
                log.exception("ledger write failed (request %s); retrying", rows[0].request_id)
                if self._closed and delay > 2:
                    log.error("dropping ledger row for request %s at shutdown", rows[0].request_id)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


# -- reading ----------------------------------------------------------------------------
def usage_totals(db: Database, *, key_name: str | None = None,
                 since: float | None = None, until: float | None = None) -> dict:
    """Totals per key (billed rows only for tokens and cost), plus the grand total.

    The `k2serve usage --json` output and `GET /admin/usage` are exactly this."""
    billed = UsageEntry.billed.is_(True)

    def billed_sum(col):
        return func.coalesce(func.sum(case((billed, col), else_=0)), 0)

    cols = (func.count(UsageEntry.id).label("requests"),
            func.coalesce(func.sum(case((billed, 1), else_=0)), 0).label("billed_requests"),
            billed_sum(UsageEntry.prompt_tokens).label("prompt_tokens"),
            billed_sum(UsageEntry.cached_tokens).label("cached_tokens"),
            billed_sum(UsageEntry.completion_tokens).label("completion_tokens"),
            billed_sum(UsageEntry.cost_usd).label("cost_usd"))
    query = (select(UsageEntry.api_key_id, ApiKey.name, *cols)
             .join(ApiKey, ApiKey.id == UsageEntry.api_key_id, isouter=True)
             .group_by(UsageEntry.api_key_id, ApiKey.name))
    with db.session() as session:
        if key_name is not None:
            key_id = session.scalar(select(ApiKey.id).where(ApiKey.name == key_name))
            if key_id is None:
                raise LookupError(f"no key named {key_name!r}")
            query = query.where(UsageEntry.api_key_id == key_id)
        if since is not None:
            query = query.where(UsageEntry.started_at >= since)
        if until is not None:
            query = query.where(UsageEntry.started_at < until)
        rows = session.execute(query.order_by(ApiKey.name)).all()
    keys = []
    total = {"requests": 0, "billed_requests": 0, "prompt_tokens": 0, "cached_tokens": 0,
             "completion_tokens": 0, "total_tokens": 0, "cost_usd": 0.0}
    for r in rows:
        item = {"key": r.name, "key_id": r.api_key_id, "requests": int(r.requests),
                "billed_requests": int(r.billed_requests),
                "prompt_tokens": int(r.prompt_tokens), "cached_tokens": int(r.cached_tokens),
                "completion_tokens": int(r.completion_tokens),
                "total_tokens": int(r.prompt_tokens) + int(r.completion_tokens),
                "cost_usd": round(float(r.cost_usd), 9)}
        keys.append(item)
        for k in total:
            total[k] += item[k]
    total["cost_usd"] = round(total["cost_usd"], 9)
    return {"since": since, "until": until, "key": key_name, "keys": keys, "total": total}


def ledger_rows(db: Database, *, key_id: str | None = None) -> list[UsageEntry]:
    with db.session() as session:
        query = select(UsageEntry).order_by(UsageEntry.id)
        if key_id is not None:
            query = query.where(UsageEntry.api_key_id == key_id)
        return list(session.scalars(query).all())
