"""The audit chain's queries: its lock, its tail, the insert of a transaction's events and
reading it back in id order. Queries only: the hashing and chaining are in `service.py`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.orm import Session as SASession
from sqlmodel import Session, col, select

from custody.db.models import AuditEvent

_PG_AUDIT_LOCK = 0x5C0A_7D17  # advisory lock key reserved for the audit chain


def lock_chain(session: SASession) -> None:
    """Serialise appends to the chain until this transaction ends. PostgreSQL: a
    transaction-level advisory lock; SQLite's write transaction (BEGIN IMMEDIATE) already
    holds the database's lock, so nothing is sent there."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=_PG_AUDIT_LOCK))


def chain_tail(session: SASession) -> tuple[int, str] | None:
    """(id, hash) of the newest event; None for an empty chain."""
    last = session.execute(
        select(AuditEvent.id, AuditEvent.hash).order_by(col(AuditEvent.id).desc()).limit(1)
    ).first()
    return (last[0], last[1]) if last else None


def insert_events(session: SASession, rows: list[dict[str, Any]]) -> None:
    """Write chained events in one INSERT (each dict names every column): a Core insert
    of the table, since the ORM's bulk insert costs more per row than the database."""
    session.execute(insert(AuditEvent.__table__), rows)  # type: ignore[attr-defined]


def events_after(session: Session, event_id: int, limit: int) -> list[AuditEvent]:
    """Up to `limit` events after `event_id`, in id order."""
    return list(
        session.exec(
            select(AuditEvent)
            .where(col(AuditEvent.id) > event_id)
            .order_by(col(AuditEvent.id))
            .limit(limit)
        ).all()
    )
