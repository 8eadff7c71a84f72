"""webhook event ids derived from the facts they report

An outbox row is unique per (webhook, event id) instead of per random event id; a loan
counts its state changes and a deposit its retractions, the parts of an event's id that
tell a replay (same id, not sent again) from news (a new id).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08 09:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# SQLite keeps 0005's unique constraint on event_id unnamed: a convention names it as
# batch mode reflects the table, so it can be dropped by that name.
_SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
_PG_EVENT_ID_UNIQUE = "outbox_event_id_key"  # PostgreSQL's own name for it


def upgrade() -> None:
    with op.batch_alter_table("loan", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("state_version", sa.Integer(), server_default="0", nullable=False)
        )
    # Loans that already moved: their version is the length of their state history.
    op.execute(
        "UPDATE loan SET state_version = (SELECT count(*) FROM auditevent "
        "WHERE auditevent.loan_id = loan.id AND auditevent.action = 'loan.state_changed')"
    )
    with op.batch_alter_table("deposit", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("retractions", sa.Integer(), server_default="0", nullable=False)
        )
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("outbox", naming_convention=_SQLITE_NAMES) as batch_op:
            batch_op.drop_constraint("uq_outbox_event_id", type_="unique")
            batch_op.create_unique_constraint("uq_outbox_webhook_event", ["webhook_id", "event_id"])
    else:
        op.drop_constraint(_PG_EVENT_ID_UNIQUE, "outbox", type_="unique")
        op.create_unique_constraint("uq_outbox_webhook_event", "outbox", ["webhook_id", "event_id"])


def downgrade() -> None:
    # Event ids repeat across webhooks now; going back keeps one row per event id.
    op.execute("DELETE FROM outbox WHERE id NOT IN (SELECT min(id) FROM outbox GROUP BY event_id)")
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("outbox", naming_convention=_SQLITE_NAMES) as batch_op:
            batch_op.drop_constraint("uq_outbox_webhook_event", type_="unique")
            batch_op.create_unique_constraint("uq_outbox_event_id", ["event_id"])
    else:
        op.drop_constraint("uq_outbox_webhook_event", "outbox", type_="unique")
        op.create_unique_constraint(_PG_EVENT_ID_UNIQUE, "outbox", ["event_id"])
    with op.batch_alter_table("deposit", schema=None) as batch_op:
        batch_op.drop_column("retractions")
    with op.batch_alter_table("loan", schema=None) as batch_op:
        batch_op.drop_column("state_version")
