"""trail_pending: intake events waiting to be chained

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import service.db

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "trail_pending",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("occurred_at", service.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=True),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("object_type", sa.String(length=32), nullable=False),
        sa.Column("object_id", sa.String(length=64), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trail_pending")),
    )
    op.create_index(
        op.f("ix_trail_pending_occurred_at"), "trail_pending", ["occurred_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_trail_pending_occurred_at"), table_name="trail_pending")
    op.drop_table("trail_pending")
