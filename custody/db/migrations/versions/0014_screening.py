"""AML screening: decisions on deposits and payout addresses, and the bank's lists

A deposit counts as collateral only once its funding transaction is screened clear (or a
compliance officer cleared it); the built-in provider reads the lists.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 04:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC_TIME = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "screeningdecision",
        sa.Column("id", ID, nullable=False),
        sa.Column("subject", sa.String(length=16), nullable=False),
        sa.Column("loan_id", ID, nullable=False),
        sa.Column("deposit_key", sa.String(length=80), nullable=True, unique=True),
        sa.Column("txid", sa.String(length=64), nullable=True),
        sa.Column("vout", sa.Integer(), nullable=True),
        sa.Column("amount_sats", sa.BigInteger(), nullable=True),
        sa.Column("address", sa.String(length=100), nullable=True),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("result", sa.String(length=16), nullable=True),
        sa.Column("score", sa.Integer(), nullable=True),
        sa.Column("reasons", sa.Text(), nullable=False),
        sa.Column("providers", sa.String(length=200), nullable=False),
        sa.Column("reference", sa.String(length=200), nullable=True),
        sa.Column("inputs", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("settle_pending", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTC_TIME(), nullable=False),
        sa.Column("decided_at", UTC_TIME(), nullable=True),
        sa.Column("resolution_reason", sa.Text(), nullable=True),
        sa.Column("resolved_by", sa.String(length=160), nullable=True),
        sa.Column("resolved_by_id", ID, nullable=True),
        sa.Column("resolved_at", UTC_TIME(), nullable=True),
        sa.ForeignKeyConstraint(["loan_id"], ["loan.id"]),
        sa.ForeignKeyConstraint(["resolved_by_id"], ["principal.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("screeningdecision", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_screeningdecision_loan_id"), ["loan_id"])
        batch_op.create_index(batch_op.f("ix_screeningdecision_status"), ["status"])
        batch_op.create_index(batch_op.f("ix_screeningdecision_address"), ["address"])
    op.create_table(
        "screeninglistentry",
        sa.Column("id", ID, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value", sa.String(length=100), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=160), nullable=False),
        sa.Column("created_at", UTC_TIME(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "value", name="uq_screening_list_entry"),
    )


def downgrade() -> None:
    op.drop_table("screeninglistentry")
    op.drop_table("screeningdecision")
