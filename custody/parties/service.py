"""Parties: the miners, the bank and the arbiters that hold a loan's seats.

One deployment serves one bank: its bank party is created once, and a second is refused
(`SecondBankParty`). Bank staff (`bank_operator`, `bank_approver`) must belong to a bank
party (`custody.auth.service`), so they all belong to that one. The admin and auditors
belong to no party: they are the deployment's own, hence the bank's."""

from __future__ import annotations

from sqlmodel import Session

from custody.audit.service import record
from custody.auth.policy import READ_ALL, require_role
from custody.db.models import Party, PartyKind, Principal, Role
from custody.errors import PartyNameTaken, PartyNotFound, SecondBankParty
from custody.parties import repository


def create_party(session: Session, principal: Principal, *, name: str, kind: PartyKind) -> Party:
    require_role(principal, Role.admin, Role.bank_operator)
    name = name.strip()
    if kind == PartyKind.bank:
        repository.lock_bank_creation(session)
        bank = repository.bank_party(session)
        if bank is not None:
            raise SecondBankParty(
                f"this deployment serves one bank, party {bank.id} ({bank.name!r}): "
                "a second bank party is refused",
                field="kind",
            )
    if repository.party_named(session, name) is not None:
        raise PartyNameTaken(f"a party named {name!r} already exists", field="name")
    party = Party(name=name, kind=kind)
    session.add(party)
    session.flush()
    record(
        session,
        actor=f"{principal.role}:{principal.name}",
        action="party.created",
        data={"party_id": party.id, "name": name, "kind": kind.value},
    )
    return party


def list_parties(session: Session, principal: Principal) -> list[Party]:
    """Staff see every party; a miner or arbiter sees only its own."""
    if principal.role not in READ_ALL:
        return repository.parties_with_id(session, principal.party_id)
    return repository.all_parties(session)


def get_party(session: Session, principal: Principal, party_id: int) -> Party:
    party = repository.party_by_id(session, party_id)
    if party is None or (principal.role not in READ_ALL and principal.party_id != party_id):
        raise PartyNotFound()
    return party
