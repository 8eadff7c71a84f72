"""watcher lease: a generation (the writers' fence) and the last step's outcome

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A lease held before this revision is generation 0: its holder (an older watcher
    # that does not fence) is taken over like any other once the lease expires.
    with op.batch_alter_table("watcherlease", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("generation", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("last_step_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("last_error_kind", sa.String(length=120), nullable=True))
        batch_op.add_column(
            sa.Column("last_error_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(
            sa.Column("failed_steps", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("stalled_since", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("watcherlease", schema=None) as batch_op:
        for name in (
            "stalled_since",
            "failed_steps",
            "last_error_at",
            "last_error_kind",
            "last_error",
            "last_step_at",
            "generation",
        ):
            batch_op.drop_column(name)
