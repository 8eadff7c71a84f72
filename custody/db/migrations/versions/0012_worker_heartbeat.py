"""Worker heartbeats

One row per `custody risk` or `custody notify` process, written after each of its passes:
`/v1/health` shows which workers are alive, when each last got through a pass and its
last error (the watcher already has its lease row for that).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 01:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workerheartbeat",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("holder", sa.String(length=120), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("beat_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("last_ok_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("passes", sa.BigInteger(), nullable=False),
        sa.Column("failed_passes", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("stopped_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("kind", "holder"),
    )


def downgrade() -> None:
    op.drop_table("workerheartbeat")
