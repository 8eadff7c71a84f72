"""signer statements and endorsements; the velocity ledger moves into the signer

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 11:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The daily limit is the bank signer's own record now (its registry), never the
    # service's database: the service's copy goes.
    with op.batch_alter_table("signerusage", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_signerusage_signer"))
        batch_op.drop_index(batch_op.f("ix_signerusage_at"))
    op.drop_table("signerusage")
    op.create_table(
        "signerstatement",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("loan_id", sa.Integer(), nullable=True),
        sa.Column("request_id", sa.Integer(), nullable=True),
        sa.Column("nonce", sa.String(length=64), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=120), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["loan_id"], ["loan.id"]),
        sa.ForeignKeyConstraint(["request_id"], ["signingrequest.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("nonce"),
    )
    with op.batch_alter_table("signerstatement", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_signerstatement_loan_id"), ["loan_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_signerstatement_request_id"), ["request_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_signerstatement_state"), ["state"], unique=False)

    op.create_table(
        "signerendorsement",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("statement_id", sa.Integer(), nullable=False),
        sa.Column("person", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("submitted_by", sa.String(length=120), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["statement_id"], ["signerstatement.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("statement_id", "person", name="uq_endorsement_once"),
    )
    with op.batch_alter_table("signerendorsement", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_signerendorsement_statement_id"), ["statement_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("signerendorsement", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_signerendorsement_statement_id"))
    op.drop_table("signerendorsement")
    with op.batch_alter_table("signerstatement", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_signerstatement_state"))
        batch_op.drop_index(batch_op.f("ix_signerstatement_request_id"))
        batch_op.drop_index(batch_op.f("ix_signerstatement_loan_id"))
    op.drop_table("signerstatement")
    op.create_table(
        "signerusage",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("signer", sa.String(length=120), nullable=False),
        sa.Column("unsigned_txid", sa.String(length=64), nullable=False),
        sa.Column("sats", sa.BigInteger(), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("signerusage", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_signerusage_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_signerusage_signer"), ["signer"], unique=False)
