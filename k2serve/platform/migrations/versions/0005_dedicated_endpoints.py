"""Dedicated endpoints (Ray Serve applications) and their replica-time usage.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

Double = sa.Float(precision=53)
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "endpoints",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("display_name", sa.String(256), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("hardware", sa.String(128), nullable=False),
        sa.Column("api_key_id", sa.String(32), nullable=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("min_replicas", sa.Integer(), nullable=False),
        sa.Column("max_replicas", sa.Integer(), nullable=False),
        sa.Column("inactive_timeout", sa.Integer(), nullable=True),
        sa.Column("created_at", Double, nullable=False),
        sa.Column("updated_at", Double, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("deleted_at", Double, nullable=True),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"],
                                name="fk_endpoints_api_key_id_api_keys"),
        sa.PrimaryKeyConstraint("id", name="pk_endpoints"),
        sa.UniqueConstraint("name", name="uq_endpoints_name"),
    )
    op.create_index("ix_endpoints_api_key_id", "endpoints", ["api_key_id"])
    op.create_table(
        "endpoint_usage",
        sa.Column("id", RowId, autoincrement=True, nullable=False),
        sa.Column("endpoint_id", sa.String(64), nullable=False),
        sa.Column("api_key_id", sa.String(32), nullable=True),
        sa.Column("hardware", sa.String(128), nullable=False),
        sa.Column("started_at", Double, nullable=False),
        sa.Column("ended_at", Double, nullable=False),
        sa.Column("replica_seconds", Double, nullable=False),
        sa.Column("cents_per_minute", Double, nullable=False),
        sa.Column("cost_usd", Double, nullable=False),
        sa.ForeignKeyConstraint(["endpoint_id"], ["endpoints.id"],
                                name="fk_endpoint_usage_endpoint_id_endpoints"),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"],
                                name="fk_endpoint_usage_api_key_id_api_keys"),
        sa.PrimaryKeyConstraint("id", name="pk_endpoint_usage"),
    )
    op.create_index("ix_endpoint_usage_endpoint_id", "endpoint_usage", ["endpoint_id"])
    op.create_index("ix_endpoint_usage_key_started", "endpoint_usage",
                    ["api_key_id", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_endpoint_usage_key_started", "endpoint_usage")
    op.drop_index("ix_endpoint_usage_endpoint_id", "endpoint_usage")
    op.drop_table("endpoint_usage")
    op.drop_index("ix_endpoints_api_key_id", "endpoints")
    op.drop_table("endpoints")
