"""The parties' queries. Who may see which party is decided in `service.py`."""

from __future__ import annotations

from sqlmodel import Session, col, select

from custody.db.models import Party


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
