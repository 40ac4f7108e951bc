"""Tables: API keys and the usage ledger. Times are Unix seconds (floats), UTC by nature.

The schema itself is owned by the Alembic revisions in `migrations/versions/`; these classes
must match them (a test compares the two).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Double = Float(precision=53)
# SQLite only auto-increments an INTEGER PRIMARY KEY.
RowId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public part of the key
    name: Mapped[str] = mapped_column(String(128), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))  # SHA-256 hex of the whole key
    prefix: Mapped[str] = mapped_column(String(40))  # shown in `keys list`
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    rpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    allowed_models: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON list
    budget_usd: Mapped[float | None] = mapped_column(Double, nullable=True)
    spent_usd: Mapped[float] = mapped_column(Double, default=0.0)
    created_at: Mapped[float] = mapped_column(Double)
    revoked_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    last_used_at: Mapped[float | None] = mapped_column(Double, nullable=True)


class UsageEntry(Base):
    """One row per request that got past authentication (generations and refusals alike)."""

    __tablename__ = "usage_ledger"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128), index=True)
    api_key_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("api_keys.id"), nullable=True)
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Double, default=0.0)
    # ok | error | client_closed | content_filter (a generation ran) | rejected (refused
    # before generating) | in_progress (running: written at admission, updated as it
    # generates) | interrupted (its server died while it ran; billed for what it produced)
    status: Mapped[str] = mapped_column(String(16))
    http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(String(64), nullable=True)  # error code
    ttft_s: Mapped[float | None] = mapped_column(Double, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Double, nullable=True)
    started_at: Mapped[float] = mapped_column(Double)
    admitted_at: Mapped[float | None] = mapped_column(Double, nullable=True)  # rate limiter clock
    retry_group: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    billed: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[float | None] = mapped_column(Double, nullable=True)  # last write
    batch_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # a batch's line

    __table_args__ = (Index("ix_usage_ledger_key_started", "api_key_id", "started_at"),
                      Index("ix_usage_ledger_batch_id", "batch_id"),
                      Index("ix_usage_ledger_started", "started_at"),
                      Index("ix_usage_ledger_status_updated", "status", "updated_at"))

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class StoredResponseRow(Base):
    """A stored OpenAI Responses API response (k2serve.api.response_store), its key's alone."""

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # resp_...
    api_key_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("api_keys.id"), nullable=True)  # None: made in open mode
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    response: Mapped[str] = mapped_column(Text)  # JSON: the Response object
    items: Mapped[str] = mapped_column(Text)  # JSON: the conversation it was generated from
    new_from: Mapped[int] = mapped_column(Integer, default=0)  # where its own input starts

    __table_args__ = (Index("ix_responses_created", "created_at"),)


class FileRow(Base):
    """An uploaded file (k2serve.api.batch_store); its bytes are in the data directory."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("api_keys.id"), nullable=True, index=True)
    filename: Mapped[str] = mapped_column(String(256))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Double)
    status: Mapped[str] = mapped_column(String(16))  # processed | uploading
    upload_token: Mapped[str | None] = mapped_column(String(64), nullable=True)  # sha256


class BatchRow(Base):
    """A batch job: its status (for the runner's queries) and its whole record as JSON."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("api_keys.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    record: Mapped[str] = mapped_column(Text)  # JSON: k2serve.api.batch_store.BatchRecord


class BatchLineRow(Base):
    """One batch line's result: the status and body its request got."""

    __tablename__ = "batch_lines"

    batch_id: Mapped[str] = mapped_column(String(64), ForeignKey("batches.id"),
                                          primary_key=True)
    line_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    status_code: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(128))
    body: Mapped[str] = mapped_column(Text)  # JSON


class EndpointRow(Base):
    """A dedicated endpoint (k2serve.platform.endpoints): what its owner asked for and the
    state it is in. Its replicas are a Ray Serve application named after its id."""

    __tablename__ = "endpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # endpoint-<uuid>
    name: Mapped[str] = mapped_column(String(256), unique=True)  # the model id clients send
    display_name: Mapped[str] = mapped_column(String(256))
    model: Mapped[str] = mapped_column(String(256))
    hardware: Mapped[str] = mapped_column(String(128))
    api_key_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("api_keys.id"), nullable=True, index=True)  # the owner
    owner: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    min_replicas: Mapped[int] = mapped_column(Integer)
    max_replicas: Mapped[int] = mapped_column(Integer)
    inactive_timeout: Mapped[int | None] = mapped_column(Integer, nullable=True)  # minutes
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # why it is in ERROR
    deleted_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    # the last request any server saw (each writes it at most once a tick): idle time
    last_request_at: Mapped[float | None] = mapped_column(Double, nullable=True)


class EndpointUsageRow(Base):
    """Replica time of a dedicated endpoint over one metering interval, at its hardware's
    price; the owner key's `spent_usd` moves by `cost_usd` in the same transaction."""

    __tablename__ = "endpoint_usage"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    endpoint_id: Mapped[str] = mapped_column(String(64), ForeignKey("endpoints.id"),
                                             index=True)
    api_key_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("api_keys.id"), nullable=True)
    hardware: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[float] = mapped_column(Double)
    ended_at: Mapped[float] = mapped_column(Double)
    replica_seconds: Mapped[float] = mapped_column(Double)
    cents_per_minute: Mapped[float] = mapped_column(Double)
    cost_usd: Mapped[float] = mapped_column(Double)

    __table_args__ = (Index("ix_endpoint_usage_key_started", "api_key_id", "started_at"),)


class VideoJobRow(Base):
    """A video generation job: its status (for the runner's queries) and its whole record
    as JSON (k2serve.api.video_store.VideoJob)."""

    __tablename__ = "video_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("api_keys.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    record: Mapped[str] = mapped_column(Text)


class LeaseRow(Base):
    """Who acts for all servers on one database, until when (k2serve.platform.lease)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True)  # a process's id
    expires_at: Mapped[float] = mapped_column(Double)
    renewed_at: Mapped[float] = mapped_column(Double)  # the holder's last renewal or release
