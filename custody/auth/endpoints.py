"""Auth endpoints: who am I, new principals (API users), and revoking or rotating their
API keys (admins only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from custody.api.deps import (
    PrincipalDep,
    PrincipalId,
    SessionDep,
)
from custody.api.errors import BODY_ERRORS, errors_for
from custody.auth.policy import require_role
from custody.auth.schemas import PrincipalCreate, PrincipalCreated, PrincipalOut
from custody.auth.service import create_principal, revoke_principal, rotate_key
from custody.db.models import Principal, Role
from custody.errors import (
    LastAdmin,
    PartyKindMismatch,
    PrincipalNameTaken,
    PrincipalNotFound,
    PrincipalRevoked,
    RoleNotAllowed,
    UnknownParty,
)
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")

# An answer that carries an API key must stay in no cache (browser, proxy, CDN).
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _no_store(response: Response) -> None:
    response.headers.update(NO_STORE)


@router.get("/me", tags=["auth"], responses=errors_for(NotAuthenticated, InvalidInput))
def me(principal: PrincipalDep) -> dict[str, Any]:
    return principal_out(principal).model_dump()


@router.post(
    "/principals",
    status_code=201,
    tags=["auth"],
    responses=errors_for(
        NotAuthenticated,
        RoleNotAllowed,
        InvalidInput,
        UnknownParty,
        PartyKindMismatch,
        PrincipalNameTaken,
        *BODY_ERRORS,
    ),
)
def create_principal_endpoint(
    body: PrincipalCreate, session: SessionDep, principal: PrincipalDep, response: Response
) -> PrincipalCreated:
    require_role(principal, Role.admin)
    created, api_key = create_principal(
        session,
        name=body.name,
        role=Role(body.role),
        party_id=body.party_id,
        actor=f"{principal.role}:{principal.name}",
    )
    _no_store(response)
    return PrincipalCreated(**principal_out(created).model_dump(), api_key=api_key)


@router.post(
    "/principals/{principal_id}/revoke",
    tags=["auth"],
    responses=errors_for(
        NotAuthenticated,
        RoleNotAllowed,
        InvalidInput,
        PrincipalNotFound,
        PrincipalRevoked,
        LastAdmin,
    ),
)
def revoke_principal_endpoint(
    principal_id: PrincipalId, session: SessionDep, principal: PrincipalDep
) -> PrincipalOut:
    """Revoke the principal's API key: from the next request on it answers 401."""
    require_role(principal, Role.admin)
    revoked = revoke_principal(
        session, actor=f"{principal.role}:{principal.name}", principal_id=principal_id
    )
    return principal_out(revoked)


@router.post(
    "/principals/{principal_id}/rotate",
    tags=["auth"],
    responses=errors_for(
        NotAuthenticated, RoleNotAllowed, InvalidInput, PrincipalNotFound, PrincipalRevoked
    ),
)
def rotate_key_endpoint(
    principal_id: PrincipalId, session: SessionDep, principal: PrincipalDep, response: Response
) -> PrincipalCreated:
    """A new API key for the principal, shown once; the old one answers 401 from the next
    request on."""
    require_role(principal, Role.admin)
    rotated, api_key = rotate_key(
        session, actor=f"{principal.role}:{principal.name}", principal_id=principal_id
    )
    _no_store(response)
    return PrincipalCreated(**principal_out(rotated).model_dump(), api_key=api_key)


def principal_out(p: Principal) -> PrincipalOut:
    assert p.id is not None
    return PrincipalOut(
        id=p.id,
        name=p.name,
        role=p.role,
        party_id=p.party_id,
        key_prefix=p.key_prefix,
        revoked=p.disabled,
    )
