"""The notify domain's queries: webhooks (by id, per party, the active ones) and the outbox rows
the delivery worker claims and settles. Queries only: who is told what, and the retry policy,
are in `outbox.py` and `delivery.py`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session as SASession
from sqlmodel import Session, col, func, select

from custody.db.models import Outbox, Party, PartyKind, Webhook


def party_by_id(session: Session, party_id: int) -> Party | None:
    return session.get(Party, party_id)


def party_ids_of_kind(session: Session, kind: PartyKind) -> list[int]:
    return [
        party_id
        for party_id in session.exec(
            select(Party.id).where(Party.kind == kind).order_by(col(Party.id))
        ).all()
        if party_id is not None
    ]


def webhook_by_id(session: Session, webhook_id: int) -> Webhook | None:
    return session.get(Webhook, webhook_id)


def webhooks(session: Session, party_id: int | None = None) -> list[Webhook]:
    """Every webhook (or only `party_id`'s), active or not, in id order."""
    query = select(Webhook).order_by(col(Webhook.id))
    if party_id is not None:
        query = query.where(Webhook.party_id == party_id)
    return list(session.exec(query).all())


def active_webhooks(session: Session) -> list[Webhook]:
    return list(
        session.exec(
            select(Webhook).where(col(Webhook.active).is_(True)).order_by(col(Webhook.id))
        ).all()
    )


def claim_due_events(session: Session, now: datetime, limit: int) -> list[tuple[Outbox, Webhook]]:
    """Up to `limit` undelivered, live outbox rows due by `now` (oldest due first) with their
    webhook, their rows locked; rows another worker holds locked are skipped (PostgreSQL)."""
    return list(
        session.exec(
            select(Outbox, Webhook)
            .join(Webhook, col(Webhook.id) == col(Outbox.webhook_id))
            .where(
                col(Outbox.delivered_at).is_(None),
                col(Outbox.dead_at).is_(None),
                col(Outbox.next_attempt_at) <= now,
            )
            .order_by(col(Outbox.next_attempt_at), col(Outbox.id))
            .limit(limit)
            .with_for_update(skip_locked=True, of=Outbox)
        ).all()
    )


def release_claims(
    session: Session, outbox_ids: list[int], claimed_until: datetime, now: datetime
) -> int:
    """Give back claims this worker will not send (it was told to stop): due again `now`,
    unless another worker has claimed them since (their lease would differ)."""
    result = session.execute(
        update(Outbox)
        .where(
            col(Outbox.id).in_(outbox_ids),
            col(Outbox.delivered_at).is_(None),
            col(Outbox.dead_at).is_(None),
            col(Outbox.next_attempt_at) == claimed_until,
        )
        .values(next_attempt_at=now)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def outbox_row_for_update(session: Session, outbox_id: int) -> Outbox | None:
    """The outbox row, its row locked (PostgreSQL) for the outcome's write."""
    return session.get(Outbox, outbox_id, with_for_update=True)


def insert_events_if_absent(session: SASession, rows: list[dict[str, Any]]) -> None:
    """Insert outbox rows (each dict names every column but `id`) in one statement, skipping
    any whose (webhook, event id) is already there (`uq_outbox_webhook_event`): ON CONFLICT
    DO NOTHING on both databases, so two writers of one fact never fail or double it."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    table = Outbox.__table__  # type: ignore[attr-defined]  # Core: no RETURNING of ids
    statement = insert(table).on_conflict_do_nothing(index_elements=["webhook_id", "event_id"])
    session.execute(statement, rows)


def outbox_backlog(session: Session) -> tuple[int, datetime | None]:
    """Rows neither delivered nor dead, and when the oldest of them was written."""
    count, oldest = session.exec(
        select(func.count(), func.min(Outbox.created_at)).where(
            col(Outbox.delivered_at).is_(None), col(Outbox.dead_at).is_(None)
        )
    ).one()
    return int(count), oldest


def outbox_dead_count(session: Session) -> int:
    """Rows whose retries ran out (kept for inspection and replay)."""
    return int(
        session.exec(
            select(func.count()).select_from(Outbox).where(col(Outbox.dead_at).is_not(None))
        ).one()
    )
