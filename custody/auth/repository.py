"""Principals' queries. The lookup by key hash runs on every request, so its statement
is built once (building it cost as much CPU as running it)."""

from __future__ import annotations

from typing import Final

from sqlalchemy import bindparam
from sqlmodel import Session, col, select

from custody.db.models import Party, Principal, Role

_BY_KEY_HASH: Final = select(Principal).where(col(Principal.key_hash) == bindparam("key_hash"))


def principal_by_key_hash(session: Session, key_hash: str) -> Principal | None:
    return session.exec(_BY_KEY_HASH, params={"key_hash": key_hash}).first()


def principal_by_name(session: Session, name: str) -> Principal | None:
    return session.exec(select(Principal).where(Principal.name == name)).first()


def party(session: Session, party_id: int) -> Party | None:
    return session.get(Party, party_id)


def principal_for_update(session: Session, principal_id: int) -> Principal | None:
    """The principal, its row locked (PostgreSQL) until the caller's transaction ends."""
    return session.get(Principal, principal_id, with_for_update=True)


def principal_by_name_for_update(session: Session, name: str) -> Principal | None:
    return session.exec(select(Principal).where(Principal.name == name).with_for_update()).first()


def active_admins_for_update(session: Session) -> list[Principal]:
    """The admins whose keys work, their rows locked: two admins revoking each other at
    once queue here, so the second sees the first's revocation."""
    return list(
        session.exec(
            select(Principal)
            .where(Principal.role == Role.admin, col(Principal.disabled).is_(False))
            .order_by(col(Principal.id))
            .with_for_update()
        ).all()
    )
