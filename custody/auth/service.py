"""API keys and principals.

A key is shown exactly once, at creation or rotation; the database keeps only its
SHA-256. Every request looks its key up in the database (`authenticate`, no cache), so a
revoked or rotated key stops working at the next request on every replica.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlmodel import Session

from custody.audit.service import record
from custody.auth import repository
from custody.db.models import PartyKind, Principal, Role
from custody.errors import (
    LastAdmin,
    PartyKindMismatch,
    PrincipalNameTaken,
    PrincipalNotFound,
    PrincipalRevoked,
    UnknownParty,
)
from pledge.errors import InvalidInput, NotAuthenticated

KEY_PREFIX = "pc_"

# Which party kind a role must (or must not) belong to.
_ROLE_PARTY_KIND: dict[Role, PartyKind | None] = {
    Role.miner: PartyKind.miner,
    Role.arbiter: PartyKind.arbiter,
    Role.bank_operator: PartyKind.bank,
    Role.bank_approver: PartyKind.bank,
    Role.compliance_officer: PartyKind.bank,
    Role.auditor: None,
    Role.admin: None,
}


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key: the prefix and 256 random bits (43 URL-safe characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_prefix(api_key: str) -> str:
    """What may be shown of a key to tell keys apart (never enough to use it)."""
    return api_key[: len(KEY_PREFIX) + 6]


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
    api_key = new_key()
    principal = Principal(
        name=name,
        role=role,
        party_id=party_id,
        key_hash=hash_key(api_key),
        key_prefix=key_prefix(api_key),
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


def _target(session: Session, principal_id: int | None, name: str | None) -> Principal:
    """The principal to revoke or rotate, by id (the API) or name (the CLI), locked."""
    if principal_id is not None:
        principal = repository.principal_for_update(session, principal_id)
        wanted = f"principal {principal_id}"
    else:
        assert name is not None
        principal = repository.principal_by_name_for_update(session, name)
        wanted = f"principal {name!r}"
    if principal is None:
        raise PrincipalNotFound(f"{wanted} not found")
    if principal.disabled:
        raise PrincipalRevoked(f"{wanted}'s API key is revoked")
    return principal


def revoke_principal(
    session: Session, *, actor: str, principal_id: int | None = None, name: str | None = None
) -> Principal:
    """Revoke a principal's API key for good (the principal stays, for the audit trail's
    names); its next request answers 401. The last admin's key cannot be revoked:
    nobody could manage keys through the API any more."""
    # The admins' rows first, always in id order, then the target (already among them if
    # it is an admin): two admins revoking each other queue instead of deadlocking.
    admins = repository.active_admins_for_update(session)
    principal = _target(session, principal_id, name)
    if [a.id for a in admins] == [principal.id]:
        raise LastAdmin(
            f"{principal.name!r} holds the last admin key: create another admin "
            "(custody create-admin) before revoking it"
        )
    principal.disabled = True
    session.add(principal)
    session.flush()
    record(
        session,
        actor=actor,
        action="principal.revoked",
        data={
            "principal_id": principal.id,
            "name": principal.name,
            "role": Role(principal.role).value,
        },
    )
    return principal


def rotate_key(
    session: Session, *, actor: str, principal_id: int | None = None, name: str | None = None
) -> tuple[Principal, str]:
    """Give a principal a new API key, returned (the only time it is visible); the old
    key answers 401 from the next request on."""
    principal = _target(session, principal_id, name)
    api_key = new_key()
    old_prefix = principal.key_prefix
    principal.key_hash = hash_key(api_key)
    principal.key_prefix = key_prefix(api_key)
    session.add(principal)
    session.flush()
    record(
        session,
        actor=actor,
        action="principal.key_rotated",
        data={
            "principal_id": principal.id,
            "name": principal.name,
            "old_key_prefix": old_prefix,
            "key_prefix": principal.key_prefix,
        },
    )
    return principal, api_key
