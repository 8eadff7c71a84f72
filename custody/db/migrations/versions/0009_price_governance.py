"""price governance: a manual price is proposed, then confirmed by a second person

`pricerecord` gains its state, the proposing principal (`set_by` becomes `proposed_by`),
when the proposal expires, and who confirmed or rejected it and when. The prices set before
this revision were set by one person alone: they stay in the history as `legacy` and are
never used (the risk engine reads only confirmed prices).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-15 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_FK_PROPOSER = "fk_pricerecord_proposed_by_id_principal"
_FK_CONFIRMER = "fk_pricerecord_confirmed_by_id_principal"
_INDEX = "ix_pricerecord_state_confirmed_at"


def upgrade() -> None:
    with op.batch_alter_table("pricerecord", schema=None) as batch_op:
        batch_op.alter_column("set_by", new_column_name="proposed_by")
        # Every existing row is a price one person set alone: `legacy`, never used.
        batch_op.add_column(
            sa.Column("state", sa.String(length=16), server_default="legacy", nullable=False)
        )
        batch_op.add_column(sa.Column("proposed_by_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(sa.Column("confirmed_by", sa.String(length=160), nullable=True))
        batch_op.add_column(sa.Column("confirmed_by_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("confirmed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(sa.Column("rejected_by", sa.String(length=160), nullable=True))
        batch_op.add_column(
            sa.Column("rejected_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.create_foreign_key(_FK_PROPOSER, "principal", ["proposed_by_id"], ["id"])
        batch_op.create_foreign_key(_FK_CONFIRMER, "principal", ["confirmed_by_id"], ["id"])
        batch_op.create_index(_INDEX, ["state", "confirmed_at"], unique=False)
    # The default only labelled the rows that were there: every new row says its state.
    with op.batch_alter_table("pricerecord", schema=None) as batch_op:
        batch_op.alter_column("state", server_default=None)


def downgrade() -> None:
    # Back to one price per row that counts: only the confirmed prices and the legacy
    # ones were ever in effect; proposals and rejected prices go.
    op.execute("DELETE FROM pricerecord WHERE state NOT IN ('confirmed', 'legacy')")
    with op.batch_alter_table("pricerecord", schema=None) as batch_op:
        batch_op.drop_index(_INDEX)
        batch_op.drop_constraint(_FK_CONFIRMER, type_="foreignkey")
        batch_op.drop_constraint(_FK_PROPOSER, type_="foreignkey")
        batch_op.drop_column("rejected_at")
        batch_op.drop_column("rejected_by")
        batch_op.drop_column("confirmed_at")
        batch_op.drop_column("confirmed_by_id")
        batch_op.drop_column("confirmed_by")
        batch_op.drop_column("expires_at")
        batch_op.drop_column("proposed_by_id")
        batch_op.drop_column("state")
        batch_op.alter_column("proposed_by", new_column_name="set_by")
