"""Uploaded files, batch jobs, each batch line's result; the ledger row's batch.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Double = sa.Float(precision=53)


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("api_key_id", sa.String(32), nullable=True),
        sa.Column("filename", sa.String(256), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", Double, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("upload_token", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"],
                                name="fk_files_api_key_id_api_keys"),
        sa.PrimaryKeyConstraint("id", name="pk_files"),
    )
    op.create_index("ix_files_api_key_id", "files", ["api_key_id"])
    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("api_key_id", sa.String(32), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", Double, nullable=False),
        sa.Column("updated_at", Double, nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"],
                                name="fk_batches_api_key_id_api_keys"),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
    )
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "batch_lines",
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("custom_id", sa.String(512), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"],
                                name="fk_batch_lines_batch_id_batches"),
        sa.PrimaryKeyConstraint("batch_id", "line_no", name="pk_batch_lines"),
    )
    with op.batch_alter_table("usage_ledger") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(64), nullable=True))
    op.create_index("ix_usage_ledger_batch_id", "usage_ledger", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_usage_ledger_batch_id", "usage_ledger")
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("batch_id")
    op.drop_table("batch_lines")
    op.drop_index("ix_batches_status", "batches")
    op.drop_table("batches")
    op.drop_index("ix_files_api_key_id", "files")
    op.drop_table("files")
