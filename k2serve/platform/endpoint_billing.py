"""Billing dedicated hardware: an endpoint's replica time at its hardware's price.

The endpoint manager meters the replicas that run (k2serve.platform.endpoints) and writes
one `endpoint_usage` row per endpoint and interval: replica-seconds, the price per minute
then, the cost. The owner key's `spent_usd` moves by the cost in the same transaction, so a
key's budget counts its endpoints as it counts its tokens. A dedicated endpoint's requests
are billed its model's token prices from the endpoints file on top (default zero: the
hardware time is the whole bill).
"""

from __future__ import annotations

from typing import Callable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from k2serve.platform.db import Database
from k2serve.platform.models import ApiKey, EndpointRow, EndpointUsageRow


def write_endpoint_usage(db: Database, *, endpoint_id: str, api_key_id: str | None,
                         hardware: str, started_at: float, ended_at: float,
                         replica_seconds: float, cents_per_minute: float,
                         fence: Callable[[Session], bool] | None = None) -> float | None:
    """Write one interval; returns its cost in USD. With `fence`, only if it says yes in
    the same transaction (the metering server still holds its lease): None if not."""
    cost = replica_seconds / 60.0 * cents_per_minute / 100.0
    with db.write() as session:
        if fence is not None and not fence(session):
            return None
        if api_key_id is not None and session.bind.dialect.name != "sqlite":
            session.execute(select(ApiKey.id).where(ApiKey.id == api_key_id).with_for_update())
        session.add(EndpointUsageRow(
            endpoint_id=endpoint_id, api_key_id=api_key_id, hardware=hardware,
            started_at=started_at, ended_at=ended_at, replica_seconds=replica_seconds,
            cents_per_minute=cents_per_minute, cost_usd=cost))
        if api_key_id is not None:
            session.execute(update(ApiKey).where(ApiKey.id == api_key_id)
                            .values(spent_usd=ApiKey.spent_usd + cost))
    return cost


def endpoint_usage_totals(db: Database, *, key_name: str | None = None,
                          since: float | None = None) -> list[dict]:
    """Per endpoint (and owner key): replica-minutes and cost, intervals that ended after
    `since`."""
    query = (select(EndpointUsageRow.endpoint_id, EndpointRow.name, EndpointRow.hardware,
                    ApiKey.name.label("key"),
                    func.sum(EndpointUsageRow.replica_seconds).label("seconds"),
                    func.sum(EndpointUsageRow.cost_usd).label("cost"))
             .join(EndpointRow, EndpointRow.id == EndpointUsageRow.endpoint_id)
             .join(ApiKey, ApiKey.id == EndpointUsageRow.api_key_id, isouter=True)
             .group_by(EndpointUsageRow.endpoint_id, EndpointRow.name, EndpointRow.hardware,
                       ApiKey.name)
             .order_by(ApiKey.name, EndpointRow.name))
    if key_name is not None:
        query = query.where(ApiKey.name == key_name)
    if since is not None:
        query = query.where(EndpointUsageRow.ended_at >= since)
    with db.session() as session:
        rows = session.execute(query).all()
    return [{"endpoint_id": r.endpoint_id, "endpoint": r.name, "hardware": r.hardware,
             "key": r.key, "replica_minutes": round(float(r.seconds) / 60.0, 6),
             "cost_usd": round(float(r.cost), 9)} for r in rows]
