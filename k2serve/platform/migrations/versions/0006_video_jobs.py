"""Video generation jobs (k2serve.api.video_store).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

Double = sa.Float(precision=53)


def upgrade() -> None:
    op.create_table(
        "video_jobs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("api_key_id", sa.String(32), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", Double, nullable=False),
        sa.Column("updated_at", Double, nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"],
                                name="fk_video_jobs_api_key_id_api_keys"),
        sa.PrimaryKeyConstraint("id", name="pk_video_jobs"),
    )
    op.create_index("ix_video_jobs_status", "video_jobs", ["status"])


def downgrade() -> None:
    op.drop_index("ix_video_jobs_status", "video_jobs")
    op.drop_table("video_jobs")
