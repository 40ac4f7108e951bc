"""A lease in the database: one process at a time acts for all servers sharing it.

Several `k2serve serve --ray` processes may share one database; only the holder of the
`endpoints` lease reconciles endpoints with the Ray cluster and meters their replica time
(k2serve.platform.endpoints). The holder renews it every tick; a holder that stops renewing
loses it `ttl_s` after its last renewal, and the next process to try takes it. Taking and
renewing are one conditional UPDATE, atomic on SQLite and PostgreSQL alike. Times are each
server's clock: the servers' clocks must agree to well within `ttl_s` (NTP does).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import or_, select, update

from k2serve.platform.db import Database
from k2serve.platform.models import LeaseRow


@dataclass(frozen=True)
class Held:
    """We hold the lease; who held it before this renewal and when they last renewed (or
    released) it: 0 if nobody ever held it."""

    previous_holder: str | None
    previous_renewed_at: float


class Lease:
    def __init__(self, db: Database, name: str, ttl_s: float, holder: str | None = None):
        self.db = db
        self.name = name
        self.ttl_s = ttl_s
        self.holder = holder or uuid.uuid4().hex  # this process

    def hold(self, now: float) -> Held | None:
        """Take or renew the lease; None when another process holds it."""
        with self.db.write() as session:
            query = select(LeaseRow.holder, LeaseRow.renewed_at).where(
                LeaseRow.name == self.name)
            if session.bind.dialect.name != "sqlite":  # SQLite's write lock is already held
                query = query.with_for_update()
            before = session.execute(query).one()
            done = session.execute(
                update(LeaseRow).where(
                    LeaseRow.name == self.name,
                    or_(LeaseRow.holder == self.holder, LeaseRow.holder.is_(None),
                        LeaseRow.expires_at < now))
                .values(holder=self.holder, expires_at=now + self.ttl_s, renewed_at=now))
        if done.rowcount != 1:
            return None
        return Held(before.holder, before.renewed_at)

    def renew_in(self, session, now: float) -> bool:
        """Renew inside the caller's write transaction: a write that must only happen
        while we hold the lease (billing) is fenced by it, on the same row lock."""
        done = session.execute(
            update(LeaseRow).where(LeaseRow.name == self.name,
                                   LeaseRow.holder == self.holder)
            .values(expires_at=now + self.ttl_s, renewed_at=now))
        return done.rowcount == 1

    def release(self, now: float) -> None:
        """Give it up now (a clean shutdown): the next process takes it at its next try."""
        with self.db.write() as session:
            session.execute(
                update(LeaseRow).where(LeaseRow.name == self.name,
                                       LeaseRow.holder == self.holder)
                .values(holder=None, expires_at=0.0, renewed_at=now))
