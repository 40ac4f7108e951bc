"""Ledger rows from admission: `updated_at` (the last write of a running request's row) and
an index to find rows still `in_progress` (a crashed server's rows are closed as
`interrupted` once they stop being updated).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Double = sa.Float(precision=53)


def upgrade() -> None:
    with op.batch_alter_table("usage_ledger") as batch:
        batch.add_column(sa.Column("updated_at", Double, nullable=True))
    op.create_index("ix_usage_ledger_status_updated", "usage_ledger", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_ledger_status_updated", "usage_ledger")
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("updated_at")
