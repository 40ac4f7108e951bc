"""The usage ledger: one row per request, from its admission to its end.

A generation's row is inserted when it is admitted (status `in_progress`), before the app
runs; its token counts are updated while it generates (every few seconds) and committed
before the last byte of its reply is sent; the final write sets its status. A server that
dies leaves `in_progress` rows that stop being updated: any server on the database closes
them as `interrupted` (billed for the tokens they recorded) once they are STALE_S old.
Refusals at admission get a single, final row.

Billing rule (see README, "Retries"): every row that used tokens is billed, with the tokens
it really used — retries included, so every token delivered is billed. The attempts of one
logical request share a `retry_group` (for the record); a retry of a request that completed
is answered with its stored reply and leaves a `replayed` row with no tokens. Totals,
budgets and `spent_usd` count billed rows.

Each write is applied in one transaction that also moves the key's `spent_usd` by the change
in billed cost; on PostgreSQL the key's row is locked first (SELECT ... FOR UPDATE) and on
SQLite the transaction takes the write lock at BEGIN.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field

from sqlalchemy import Integer, case, cast, func, insert, select, update
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from k2serve.platform.db import Database
from k2serve.platform.models import ApiKey, UsageEntry
from k2serve.telemetry.metrics import LEDGER_LAG, LEDGER_SET_ASIDE

log = logging.getLogger("k2serve.platform.ledger")

IN_PROGRESS = "in_progress"
INTERRUPTED = "interrupted"
_INT_MAX = 2**31 - 1  # INTEGER columns on PostgreSQL


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
    batch_id: str | None = None  # a batch line's batch (billed at the batch price)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _eligible(prompt_tokens, completion_tokens):
    """Rows that can be billed: those that used tokens (a refusal never did)."""
    return (prompt_tokens + completion_tokens) > 0


def _text(value, limit: int) -> str | None:
    """A string every database stores: no NUL (PostgreSQL refuses it), no lone surrogate
    (from JSON's "\\ud800": not encodable as UTF-8), cut to the column's length. Client
    text such as `model` reaches the ledger, and a row the database refuses is lost usage."""
    if value is None:
        return None
    text = str(value).replace("\x00", "\ufffd")
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text[:limit]


def _count(value) -> int:
    return max(0, min(int(value or 0), _INT_MAX))


def _columns(row: LedgerRow, now: float) -> dict:
    return dict(
        request_id=_text(row.request_id, 128) or "", api_key_id=row.api_key_id,
        model=_text(row.model, 256) or None, endpoint=_text(row.endpoint, 64) or "",
        prompt_tokens=_count(row.prompt_tokens), cached_tokens=_count(row.cached_tokens),
        completion_tokens=_count(row.completion_tokens), cost_usd=float(row.cost_usd),
        status=_text(row.status, 16), http_status=row.http_status,
        error=_text(row.error, 64) or None, ttft_s=row.ttft_s, duration_s=row.duration_s,
        started_at=row.started_at, admitted_at=row.admitted_at,
        retry_group=_text(row.retry_group, 64), retry_count=_count(row.retry_count),
        batch_id=_text(row.batch_id, 64), updated_at=now)


# The tables, not the ORM classes: Core statements skip the ORM's bulk-DML bookkeeping
# (session synchronisation), which cost more CPU than the SQL itself on every request.
_USAGE = UsageEntry.__table__
_KEYS = ApiKey.__table__


def apply_row(session, row: LedgerRow, entry_id: int | None = None) -> int:
    """Write one row's state — a new row, or (`entry_id`) the latest state of a row written
    at admission — bill it when it used tokens, and move the key's spend by the change in
    billed cost. Returns the row's id."""
    values = _columns(row, time.time())
    if entry_id is None and row.status == IN_PROGRESS and \
            not _eligible(values["prompt_tokens"], values["completion_tokens"]):
        # A row written at admission bills nothing yet: just the insert, no key lock (every
        # request pays for this one).
        return session.execute(insert(_USAGE).values(**values, billed=False)
                               .returning(_USAGE.c.id)).scalar_one()
    if row.api_key_id is not None and session.bind.dialect.name != "sqlite":
        # (SQLite's BEGIN IMMEDIATE already holds the one write lock.)
        session.execute(select(_KEYS.c.id).where(_KEYS.c.id == row.api_key_id)
                        .with_for_update())
    # Every attempt is billed for the tokens it used, retries included (README "Retries").
    billed = _eligible(values["prompt_tokens"], values["completion_tokens"])
    delta = values["cost_usd"] if billed else 0.0  # the change in the key's billed spend
    if entry_id is None:
        entry_id = session.execute(insert(_USAGE).values(**values, billed=billed)
                                   .returning(_USAGE.c.id)).scalar_one()
    else:
        old = session.execute(select(_USAGE.c.cost_usd, _USAGE.c.billed)
                              .where(_USAGE.c.id == entry_id)).one_or_none()
        if old is None:
            raise LookupError(f"no ledger row {entry_id}")
        session.execute(update(_USAGE).where(_USAGE.c.id == entry_id)
                        .values(**values, billed=billed))
        if old.billed:
            delta -= old.cost_usd
    if row.api_key_id is not None:
        last = _KEYS.c.last_used_at
        session.execute(update(_KEYS).where(_KEYS.c.id == row.api_key_id).values(
            spent_usd=_KEYS.c.spent_usd + delta,
            last_used_at=case((last.is_(None) | (last < row.started_at), row.started_at),
                              else_=last)))
    return entry_id


@dataclass(eq=False)
class _Op:
    """One write: insert `row` (entry_id None) or set row `entry_id` to `row`'s state."""

    row: LedgerRow
    entry_id: int | None
    notify: list = field(default_factory=list)  # callables(entry id, or None if set aside)
    attempts: int = 0
    failing_since: float | None = None
    not_before: float = 0.0
    queued_at: float = field(default_factory=time.monotonic)  # its write lag starts here

    @property
    def key(self):
        return ("row", self.entry_id) if self.entry_id is not None else ("op", id(self))


_TICK = object()


class LedgerWriter:
    """Writes go on a queue; one thread applies them, a batch per transaction.

    Updates of one row carry its whole state, so a newer one replaces a queued older one. A
    write that fails is retried with backoff while the others go on; one the database keeps
    refusing (ATTEMPTS times, or for OUTAGE_S when it is unreachable) is logged in full at
    ERROR and set aside (`set_aside`) — never retried forever, never holding later rows back.
    The thread also keeps this process's running rows fresh (HEARTBEAT_S) and closes rows
    left `in_progress` by a dead server (not updated for STALE_S) as `interrupted`.
    """

    BATCH = 200
    ATTEMPTS = 3
    OUTAGE_S = 60.0
    HEARTBEAT_S = 2.0
    STALE_S = 10.0
    SWEEP_S = 5.0

    def __init__(self, db: Database):
        self.db = db
        self._queue: queue.Queue = queue.Queue()
        self._pending: dict = {}  # op key -> _Op, oldest first
        self._open: set[int] = set()  # this process's in_progress rows
        self._closed = False
        self._stopping = False
        self._next_heartbeat = 0.0
        self._next_sweep = 0.0
        self.set_aside: collections.deque = collections.deque(maxlen=10_000)
        self.written = 0
        self.interrupted_closed = 0
        self._thread = threading.Thread(target=self._run, name="k2serve-ledger", daemon=True)
        self._thread.start()

    # -- producers (any thread) ------------------------------------------------------------
    def submit(self, row: LedgerRow, entry_id: int | None = None, notify=None) -> None:
        """Queue a write; `notify(entry id or None)` runs on the writer thread when it has
        landed (or been set aside)."""
        if self._closed:
            log.error("ledger writer closed; row not written: %s", _describe(row))
            if notify is not None:
                notify(None)
            return
        self._queue.put(_Op(row, entry_id, [notify] if notify is not None else []))

    async def write(self, row: LedgerRow, entry_id: int | None = None,
                    timeout: float = 30.0) -> int | None:
        """Queue a write and wait (without blocking the event loop) until it is committed:
        the row's id, or None if it was set aside or did not land within `timeout`."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def landed(result):
            def resolve():
                if not future.done():
                    future.set_result(result)
            try:
                loop.call_soon_threadsafe(resolve)
            except RuntimeError:  # the loop has closed
                pass

        self.submit(row, entry_id, landed)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            log.error("ledger write of request %s not committed within %.0f s",
                      row.request_id, timeout)
            return None

    def backlog(self) -> tuple[int, float]:
        """Writes not committed yet, and how long the oldest has waited (s); read from
        another thread for /metrics, so approximate."""
        try:
            oldest = min((op.queued_at for op in list(self._pending.values())), default=None)
        except RuntimeError:  # changed while read
            oldest = None
        count = self._queue.qsize() + len(self._pending)
        return count, (time.monotonic() - oldest if oldest is not None else 0.0)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every write submitted so far has landed (or been set aside)."""
        marker = threading.Event()
        self._queue.put(marker)
        return marker.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the writer thread ---------------------------------------------------------------
    def _run(self) -> None:
        markers: list[threading.Event] = []
        while True:
            try:
                items = [self._queue.get(timeout=self._wait_s())]
            except queue.Empty:
                items = [_TICK]
            while len(items) < self.BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is None:
                    self._stopping = True
                elif isinstance(item, threading.Event):
                    markers.append(item)
                elif isinstance(item, _Op):
                    self._add(item)
            self._write_due()
            self._housekeeping()
            if not self._pending:
                for m in markers:
                    m.set()
                markers = []
                if self._stopping:
                    break
        self._close_own_rows()

    def _wait_s(self) -> float:
        now = time.monotonic()
        wake = min([self._next_sweep] + [op.not_before for op in self._pending.values()]
                   + ([self._next_heartbeat] if self._open else []))
        return min(max(wake - now, 0.001), self.SWEEP_S)

    def _add(self, op: _Op) -> None:
        older = self._pending.get(op.key)
        if older is not None:  # a newer state of the same row replaces the queued one
            op.notify = older.notify + op.notify
            op.attempts, op.failing_since = older.attempts, older.failing_since
            op.not_before = older.not_before
        self._pending[op.key] = op

    def _write_due(self) -> None:
        while True:
            now = time.monotonic()
            due = [op for op in self._pending.values() if op.not_before <= now][:self.BATCH]
            if not due:
                return
            try:
                ids = self._apply(due)
            except Exception as exc:
                if _unreachable(exc) or len(due) == 1:
                    for op in due:
                        self._failed(op, exc)
                    continue
                for op in due:  # find the bad row rather than hold the good ones back
                    try:
                        ids = self._apply([op])
                    except Exception as one:
                        self._failed(op, one)
                    else:
                        self._landed(op, ids[0])
                continue
            for op, entry_id in zip(due, ids):
                self._landed(op, entry_id)

    def _apply(self, ops: list[_Op]) -> list[int]:
        with self.db.write() as session:
            keys = sorted({op.row.api_key_id for op in ops if op.row.api_key_id is not None})
            if len(keys) > 1 and session.bind.dialect.name != "sqlite":
                # Lock the batch's keys in one order: another server's writer locking the
                # same keys row by row in another order would deadlock with this one.
                session.execute(select(ApiKey.id).where(ApiKey.id.in_(keys))
                                .order_by(ApiKey.id).with_for_update())
            return [apply_row(session, op.row, op.entry_id) for op in ops]

    def _landed(self, op: _Op, entry_id: int) -> None:
        self._pending.pop(op.key, None)
        self.written += 1
        LEDGER_LAG.observe(time.monotonic() - op.queued_at)
        if op.row.status == IN_PROGRESS:
            self._open.add(entry_id)
        else:
            self._open.discard(entry_id)
        self._notify(op, entry_id)

    def _failed(self, op: _Op, exc: Exception) -> None:
        now = time.monotonic()
        op.attempts += 1
        op.failing_since = op.failing_since or now
        unreachable = _unreachable(exc)
        give_up = (op.attempts >= self.ATTEMPTS and (not unreachable or self._stopping)) or \
            now - op.failing_since >= self.OUTAGE_S
        if not give_up:
            if op.attempts == 1:
                log.warning("ledger write failed (request %s), retrying: %s",
                            op.row.request_id, exc)
            op.not_before = now + min(0.05 * 4 ** op.attempts, 5.0)
            return
        self._pending.pop(op.key, None)
        self.set_aside.append(op.row)
        LEDGER_SET_ASIDE.inc()
        log.error("ledger row set aside after %d failed writes (%s): %s", op.attempts,
                  exc, _describe(op.row, op.entry_id))
        self._notify(op, None)

    @staticmethod
    def _notify(op: _Op, result) -> None:
        for fn in op.notify:
            try:
                fn(result)
            except Exception:
                log.exception("ledger notify failed")

    def _housekeeping(self) -> None:
        now = time.monotonic()
        try:
            if self._open and now >= self._next_heartbeat:
                self._next_heartbeat = now + self.HEARTBEAT_S
                self._heartbeat()
            if now >= self._next_sweep:
                self._next_sweep = now + self.SWEEP_S
                self._sweep()
        except Exception:  # the database may be down: the next round tries again
            log.warning("ledger housekeeping failed", exc_info=True)

    def _heartbeat(self) -> None:
        """Keep this process's running rows from looking abandoned."""
        ids = sorted(self._open)
        with self.db.write() as session:
            for i in range(0, len(ids), 500):
                session.execute(update(UsageEntry)
                                .where(UsageEntry.id.in_(ids[i:i + 500]),
                                       UsageEntry.status == IN_PROGRESS)
                                .values(updated_at=time.time()))

    def _sweep(self) -> None:
        """Close the rows of requests whose server died: `in_progress`, not written for
        STALE_S (their server would have refreshed them every HEARTBEAT_S). Their tokens and
        billing are those last recorded; only the status changes, so closing the row of a
        server that is merely slow is harmless: its next write sets the status again.
        (Servers sharing a database need clocks in step to well within STALE_S.)"""
        cutoff = time.time() - self.STALE_S
        stale = ((UsageEntry.status == IN_PROGRESS) & (UsageEntry.updated_at < cutoff))
        if self._open:
            stale = stale & UsageEntry.id.not_in(sorted(self._open))
        with self.db.write() as session:
            closed = session.execute(update(UsageEntry).where(stale).values(
                status=INTERRUPTED, error="server_stopped",
                duration_s=func.coalesce(UsageEntry.duration_s,
                                         UsageEntry.updated_at - UsageEntry.started_at))
            ).rowcount
        if closed:
            self.interrupted_closed += closed
            log.warning("closed %d ledger rows of requests interrupted by a server that "
                        "stopped (status interrupted, billed for the tokens recorded)", closed)

    def _close_own_rows(self) -> None:
        """At shutdown: rows of requests still running here are interrupted."""
        if not self._open:
            return
        ids = sorted(self._open)
        try:
            with self.db.write() as session:
                for i in range(0, len(ids), 500):
                    session.execute(update(UsageEntry)
                                    .where(UsageEntry.id.in_(ids[i:i + 500]),
                                           UsageEntry.status == IN_PROGRESS)
                                    .values(status=INTERRUPTED, error="server_shutdown",
                                            updated_at=time.time()))
            self._open.clear()
        except Exception:
            log.warning("could not close %d running ledger rows at shutdown; the next "
                        "server closes them", len(ids), exc_info=True)


def _unreachable(exc: Exception) -> bool:
    """The database, not the row, is the problem (down, locked, connection lost, no free
    connection)."""
    if isinstance(exc, (OperationalError, DisconnectionError, PoolTimeout)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _describe(row: LedgerRow, entry_id: int | None = None) -> str:
    """The whole row, for the log: enough to replay it by hand."""
    fields = asdict(row)
    fields["entry_id"] = entry_id
    return json.dumps(fields, default=str, ensure_ascii=True)


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
            billed_sum(UsageEntry.cost_usd).label("cost_usd"),
            func.coalesce(func.sum(case((billed & UsageEntry.batch_id.is_not(None), 1),
                                        else_=0)), 0).label("batch_requests"),
            func.coalesce(func.sum(case((billed & UsageEntry.batch_id.is_not(None),
                                         UsageEntry.cost_usd), else_=0)), 0)
            .label("batch_cost_usd"))
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
             "completion_tokens": 0, "total_tokens": 0, "cost_usd": 0.0,
             "batch_requests": 0, "batch_cost_usd": 0.0}  # batch lines: included, and apart
    for r in rows:
        item = {"key": r.name, "key_id": r.api_key_id, "requests": int(r.requests),
                "billed_requests": int(r.billed_requests),
                "prompt_tokens": int(r.prompt_tokens), "cached_tokens": int(r.cached_tokens),
                "completion_tokens": int(r.completion_tokens),
                "total_tokens": int(r.prompt_tokens) + int(r.completion_tokens),
                "cost_usd": round(float(r.cost_usd), 9),
                "batch_requests": int(r.batch_requests),
                "batch_cost_usd": round(float(r.batch_cost_usd), 9)}
        keys.append(item)
        for k in total:
            total[k] += item[k]
    total["cost_usd"] = round(total["cost_usd"], 9)
    total["batch_cost_usd"] = round(total["batch_cost_usd"], 9)
    return {"since": since, "until": until, "key": key_name, "keys": keys, "total": total}


def ledger_rows(db: Database, *, key_id: str | None = None) -> list[UsageEntry]:
    with db.session() as session:
        query = select(UsageEntry).order_by(UsageEntry.id)
        if key_id is not None:
            query = query.where(UsageEntry.api_key_id == key_id)
        return list(session.scalars(query).all())


DAY_S = 86400


def usage_by_day(db: Database, *, key_id: str | None = None, every_key: bool = False,
                 since: float | None = None) -> list[dict]:
    """Rows per UTC day and model (and key, with `every_key`): requests, billed tokens and
    cost, oldest day first. Without `every_key`, one key's rows (`key_id` None: open mode's,
    which carry no key). What the playground's usage chart draws."""
    billed = UsageEntry.billed.is_(True)

    def billed_sum(col):
        return func.coalesce(func.sum(case((billed, col), else_=0)), 0)

    # Times are positive, so SQLite's CAST (truncation) floors as PostgreSQL's floor() does.
    day = (cast(UsageEntry.started_at / DAY_S, Integer) if db.dialect == "sqlite"
           else func.floor(UsageEntry.started_at / DAY_S)).label("day")
    group = [day, UsageEntry.model] + ([UsageEntry.api_key_id, ApiKey.name] if every_key else [])
    query = select(*group, func.count(UsageEntry.id).label("requests"),
                   billed_sum(UsageEntry.prompt_tokens).label("prompt_tokens"),
                   billed_sum(UsageEntry.cached_tokens).label("cached_tokens"),
                   billed_sum(UsageEntry.completion_tokens).label("completion_tokens"),
                   billed_sum(UsageEntry.cost_usd).label("cost_usd"))
    if every_key:
        query = query.join(ApiKey, ApiKey.id == UsageEntry.api_key_id, isouter=True)
    else:
        query = query.where(UsageEntry.api_key_id.is_(None) if key_id is None
                            else UsageEntry.api_key_id == key_id)
    if since is not None:
        query = query.where(UsageEntry.started_at >= since)
    query = query.group_by(*group).order_by(day, UsageEntry.model)
    with db.session() as session:
        rows = session.execute(query).all()
    out = []
    for r in rows:
        item = {"day": time.strftime("%Y-%m-%d", time.gmtime(int(r.day) * DAY_S)),
                "model": r.model, "requests": int(r.requests),
                "prompt_tokens": int(r.prompt_tokens), "cached_tokens": int(r.cached_tokens),
                "completion_tokens": int(r.completion_tokens),
                "total_tokens": int(r.prompt_tokens) + int(r.completion_tokens),
                "cost_usd": round(float(r.cost_usd), 9)}
        if every_key:
            item["key"] = r.name
        out.append(item)
    return out
