"""Leases: which server's endpoint manager acts on the Ray cluster (k2serve.platform.lease);
an endpoint's last request on any server (its idle time, for scale to zero).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

Double = sa.Float(precision=53)


def upgrade() -> None:
    leases = op.create_table(
        "leases",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("expires_at", Double, nullable=False),
        sa.Column("renewed_at", Double, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_leases"),
    )
    # The row exists before any server runs, so taking it is always one UPDATE.
    op.bulk_insert(leases, [{"name": "endpoints", "holder": None, "expires_at": 0.0,
                             "renewed_at": 0.0}])
    op.add_column("endpoints", sa.Column("last_request_at", Double, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("endpoints") as batch:  # SQLite drops a column by copying
        batch.drop_column("last_request_at")
    op.drop_table("leases")
