"""Party endpoints: miners, banks and arbiters."""

from __future__ import annotations

from fastapi import APIRouter

from custody.api.deps import (
    PartyId,
    PrincipalDep,
    SessionDep,
)
from custody.api.errors import BODY_ERRORS, errors_for
from custody.db.models import Party, PartyKind
from custody.errors import PartyNameTaken, PartyNotFound, RoleNotAllowed, SecondBankParty
from custody.parties import service as parties
from custody.parties.schemas import PartyCreate, PartyOut
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")


@router.post(
    "/parties",
    status_code=201,
    tags=["parties"],
    responses=errors_for(
        NotAuthenticated,
        RoleNotAllowed,
        InvalidInput,
        PartyNameTaken,
        SecondBankParty,
        *BODY_ERRORS,
    ),
)
def create_party(body: PartyCreate, session: SessionDep, principal: PrincipalDep) -> PartyOut:
    return party_out(
        parties.create_party(session, principal, name=body.name, kind=PartyKind(body.kind))
    )


@router.get("/parties", tags=["parties"], responses=errors_for(NotAuthenticated, InvalidInput))
def list_parties(session: SessionDep, principal: PrincipalDep) -> list[PartyOut]:
    return [party_out(p) for p in parties.list_parties(session, principal)]


@router.get(
    "/parties/{party_id}",
    tags=["parties"],
    responses=errors_for(NotAuthenticated, InvalidInput, PartyNotFound),
)
def get_party(party_id: PartyId, session: SessionDep, principal: PrincipalDep) -> PartyOut:
    return party_out(parties.get_party(session, principal, party_id))


def party_out(party: Party) -> PartyOut:
    assert party.id is not None
    return PartyOut(id=party.id, name=party.name, kind=party.kind)
