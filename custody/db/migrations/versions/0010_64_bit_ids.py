"""64-bit ids on PostgreSQL

Every id column, and every column that holds one, becomes BIGINT, with the sequence that
numbers it: a 32-bit column made `GET /v1/loans/2147483648` a failed query (500), and ids
would have run out at 2^31. SQLite's INTEGER is already 64-bit (and its INTEGER PRIMARY KEY
must stay the rowid alias), so there this is a no-op.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# (table, columns holding an id), as the models had them at this revision.
ID_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("party", ("id",)),
    ("principal", ("id", "party_id")),
    ("loan", ("id", "miner_party_id", "bank_party_id", "arbiter_party_id", "created_by")),
    ("loankey", ("id", "loan_id", "party_id", "created_by")),
    ("collateraladdress", ("id", "loan_id")),
    ("auditevent", ("id", "loan_id", "request_id")),
    ("deposit", ("id", "loan_id", "address_id")),
    ("chaincursor", ("id",)),
    ("watcherlease", ("id",)),
    ("signingrequest", ("id", "loan_id", "replaces_id")),
    ("approval", ("id", "request_id", "principal_id")),
    ("signerstatement", ("id", "loan_id", "request_id")),
    ("signerendorsement", ("id", "statement_id")),
    ("pricerecord", ("id", "proposed_by_id", "confirmed_by_id")),
    ("webhook", ("id", "party_id")),
    ("outbox", ("id", "webhook_id")),
)


def _retype(column_type: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for table, columns in ID_COLUMNS:
        # One statement per table: its foreign keys are checked again once, not per column.
        op.execute(
            f"ALTER TABLE {table} "
            + ", ".join(f"ALTER COLUMN {c} TYPE {column_type}" for c in columns)
        )
        sequence = bind.execute(
            sa.text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": table}
        ).scalar()
        if sequence is not None:
            # AS changes the bounds with the type (a serial's sequence stops at 2^31 - 1).
            op.execute(f"ALTER SEQUENCE {sequence} AS {column_type}")


def upgrade() -> None:
    _retype("BIGINT")


def downgrade() -> None:
    # Fails, and changes nothing, if an id beyond 2^31 - 1 is already in use.
    _retype("INTEGER")
