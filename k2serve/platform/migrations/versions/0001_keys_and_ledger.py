"""API keys and the usage ledger.

Revision ID: 0001
Revises:
Create Date: 2026-05-20
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Double = sa.Float(precision=53)
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(40), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("rpm_limit", sa.Integer(), nullable=True),
        sa.Column("tpm_limit", sa.Integer(), nullable=True),
        sa.Column("allowed_models", sa.Text(), nullable=True),
        sa.Column("budget_usd", Double, nullable=True),
        sa.Column("spent_usd", Double, nullable=False),
        sa.Column("created_at", Double, nullable=False),
        sa.Column("revoked_at", Double, nullable=True),
        sa.Column("last_used_at", Double, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("name", name="uq_api_keys_name"),
    )
    op.create_table(
        "usage_ledger",
        sa.Column("id", RowId, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("api_key_id", sa.String(32), nullable=True),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", Double, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(64), nullable=True),
        sa.Column("ttft_s", Double, nullable=True),
        sa.Column("duration_s", Double, nullable=True),
        sa.Column("started_at", Double, nullable=False),
        sa.Column("admitted_at", Double, nullable=True),
        sa.Column("retry_group", sa.String(64), nullable=True),
        sa.Column("retry_count", sa.Integer(), nullable=False),
        sa.Column("billed", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"],
                                name="fk_usage_ledger_api_key_id_api_keys"),
        sa.PrimaryKeyConstraint("id", name="pk_usage_ledger"),
    )
    op.create_index("ix_usage_ledger_request_id", "usage_ledger", ["request_id"])
    op.create_index("ix_usage_ledger_retry_group", "usage_ledger", ["retry_group"])
    op.create_index("ix_usage_ledger_key_started", "usage_ledger", ["api_key_id", "started_at"])
    op.create_index("ix_usage_ledger_started", "usage_ledger", ["started_at"])


def downgrade() -> None:
    op.drop_table("usage_ledger")
    op.drop_table("api_keys")
