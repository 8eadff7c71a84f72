"""API keys and principals.

A key is shown exactly once, at creation; the database keeps only its SHA-256.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlmodel import Session

from custody.audit.service import record
from custody.auth import repository
from custody.db.models import PartyKind, Principal, Role
from custody.errors import PartyKindMismatch, PrincipalNameTaken, UnknownParty
from pledge.errors import InvalidInput, NotAuthenticated

KEY_PREFIX = "pc_"

# Which party kind a role must (or must not) belong to.
_ROLE_PARTY_KIND: dict[Role, PartyKind | None] = {
    Role.miner: PartyKind.miner,
    Role.arbiter: PartyKind.arbiter,
    Role.bank_operator: PartyKind.bank,
    Role.bank_approver: PartyKind.bank,
    Role.auditor: None,
    Role.admin: None,
}


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def authenticate(session: Session, api_key: str | None) -> Principal:
    if not api_key:
        raise NotAuthenticated("missing API key: send 'Authorization: Bearer <key>'")
    principal = repository.principal_by_key_hash(session, hash_key(api_key))
    if principal is None or principal.disabled:
        raise NotAuthenticated("unknown or disabled API key")
    return principal


def create_principal(
    session: Session, *, name: str, role: Role, party_id: int | None, actor: str
) -> tuple[Principal, str]:
    """Returns the principal and its API key (the only time the key is visible)."""
    name = name.strip()
    if not name or len(name) > 120:
        raise InvalidInput("name must be 1-120 characters", field="name")
    wanted_kind = _ROLE_PARTY_KIND[role]
    if wanted_kind is not None:
        if party_id is None:
            raise InvalidInput(
                f"role {role.value} needs a {wanted_kind.value} party", field="party_id"
            )
        party = repository.party(session, party_id)
        if party is None:
            raise UnknownParty(f"party {party_id} does not exist", field="party_id")
        if party.kind != wanted_kind:
            raise PartyKindMismatch(
                f"role {role.value} needs a {wanted_kind.value} party, party {party_id} is a "
                f"{party.kind}",
                field="party_id",
            )
    elif party_id is not None:
        raise InvalidInput(f"role {role.value} does not belong to a party", field="party_id")
    if repository.principal_by_name(session, name) is not None:
        raise PrincipalNameTaken(f"a principal named {name!r} already exists", field="name")
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    principal = Principal(
        name=name,
        role=role,
        party_id=party_id,
        key_hash=hash_key(api_key),
        key_prefix=api_key[: len(KEY_PREFIX) + 6],
    )
    session.add(principal)
    session.flush()
    record(
        session,
        actor=actor,
        action="principal.created",
        data={"principal_id": principal.id, "name": name, "role": role.value, "party_id": party_id},
    )
    return principal, api_key
