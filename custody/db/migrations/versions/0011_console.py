"""the web console: invitations, passkeys, sessions and WebAuthn challenges

Only hashes of the invitation and session tokens and public WebAuthn data are stored.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 01:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC_TIME = sqlmodel.sql.sqltypes.UTCDateTime


def _principal_table(name: str, *columns: sa.Column[object]) -> None:
    """A table of rows that each belong to one principal, indexed by it."""
    op.create_table(
        name,
        sa.Column("id", ID, nullable=False),
        sa.Column("principal_id", ID, nullable=False),
        *columns,
        sa.ForeignKeyConstraint(["principal_id"], ["principal.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table(name, schema=None) as batch_op:
        batch_op.create_index(batch_op.f(f"ix_{name}_principal_id"), ["principal_id"])


def upgrade() -> None:
    _principal_table(
        "consoleinvitation",
        sa.Column("token_hash", sa.String(length=64), nullable=False, unique=True),
        sa.Column("created_by", sa.String(length=160), nullable=False),
        sa.Column("created_at", UTC_TIME(), nullable=False),
        sa.Column("expires_at", UTC_TIME(), nullable=False),
        sa.Column("used_at", UTC_TIME(), nullable=True),
    )
    _principal_table(
        "consolepasskey",
        sa.Column("credential_id", sa.String(length=1400), nullable=False, unique=True),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("sign_count", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTC_TIME(), nullable=False),
        sa.Column("last_used_at", UTC_TIME(), nullable=True),
    )
    _principal_table(
        "consolesession",
        sa.Column("token_hash", sa.String(length=64), nullable=False, unique=True),
        sa.Column("created_at", UTC_TIME(), nullable=False),
        sa.Column("last_seen_at", UTC_TIME(), nullable=False),
    )
    op.create_table(
        "consolechallenge",
        sa.Column("id", ID, nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("challenge", sa.String(length=128), nullable=False, unique=True),
        sa.Column("invitation_id", ID, nullable=True),
        sa.Column("expires_at", UTC_TIME(), nullable=False),
        sa.ForeignKeyConstraint(["invitation_id"], ["consoleinvitation.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("consolechallenge", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_consolechallenge_invitation_id"), ["invitation_id"])


def downgrade() -> None:
    for name, column in (
        ("consolechallenge", "invitation_id"),
        ("consolesession", "principal_id"),
        ("consolepasskey", "principal_id"),
        ("consoleinvitation", "principal_id"),
    ):
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f"ix_{name}_{column}"))
        op.drop_table(name)
