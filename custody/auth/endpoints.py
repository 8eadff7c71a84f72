"""Auth endpoints: who am I, and new principals (API users)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from custody.api.deps import (
    PrincipalDep,
    SessionDep,
)
from custody.api.errors import BODY_ERRORS, errors_for
from custody.auth.policy import require_role
from custody.auth.schemas import PrincipalCreate, PrincipalCreated, PrincipalOut
from custody.auth.service import create_principal
from custody.db.models import Principal, Role
from custody.errors import PartyKindMismatch, PrincipalNameTaken, RoleNotAllowed, UnknownParty
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")


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
    body: PrincipalCreate, session: SessionDep, principal: PrincipalDep
) -> PrincipalCreated:
    require_role(principal, Role.admin)
    created, api_key = create_principal(
        session,
        name=body.name,
        role=Role(body.role),
        party_id=body.party_id,
        actor=f"{principal.role}:{principal.name}",
    )
    return PrincipalCreated(**principal_out(created).model_dump(), api_key=api_key)


def principal_out(p: Principal) -> PrincipalOut:
    assert p.id is not None
    return PrincipalOut(
        id=p.id, name=p.name, role=p.role, party_id=p.party_id, key_prefix=p.key_prefix
    )
