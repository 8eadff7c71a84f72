"""Principals' queries. The lookup by key hash runs on every request, so its statement
is built once (building it cost as much CPU as running it)."""

from __future__ import annotations

from typing import Final

from sqlalchemy import bindparam
from sqlmodel import Session, col, select

from custody.db.models import Party, Principal

_BY_KEY_HASH: Final = select(Principal).where(col(Principal.key_hash) == bindparam("key_hash"))


def principal_by_key_hash(session: Session, key_hash: str) -> Principal | None:
    return session.exec(_BY_KEY_HASH, params={"key_hash": key_hash}).first()


def principal_by_name(session: Session, name: str) -> Principal | None:
    return session.exec(select(Principal).where(Principal.name == name)).first()


def party(session: Session, party_id: int) -> Party | None:
    return session.get(Party, party_id)
