"""The parties' queries. Who may see which party is decided in `service.py`."""

from __future__ import annotations

from sqlalchemy import text
from sqlmodel import Session, col, select

from custody.db.models import Party, PartyKind

_PG_BANK_LOCK = 0x5C0A_BA4C  # advisory lock key reserved for creating the bank party


def party_by_id(session: Session, party_id: int) -> Party | None:
    return session.get(Party, party_id)


def party_named(session: Session, name: str) -> Party | None:
    return session.exec(select(Party).where(Party.name == name)).first()


def all_parties(session: Session) -> list[Party]:
    """Every party, in id order."""
    return list(session.exec(select(Party).order_by(col(Party.id))).all())


def parties_with_id(session: Session, party_id: int | None) -> list[Party]:
    """The party with this id, as a list (empty if there is none, or for None)."""
    return list(
        session.exec(select(Party).order_by(col(Party.id)).where(Party.id == party_id)).all()
    )


def bank_party(session: Session) -> Party | None:
    """The deployment's bank party (the first, should an old database hold more)."""
    return session.exec(
        select(Party).where(Party.kind == PartyKind.bank).order_by(col(Party.id)).limit(1)
    ).first()


def lock_bank_creation(session: Session) -> None:
    """Serialize the check-then-insert of the bank party. PostgreSQL: a transaction-level
    advisory lock (two concurrent creations would otherwise both find no bank); SQLite's
    write transaction (BEGIN IMMEDIATE) already holds the database."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=_PG_BANK_LOCK))
