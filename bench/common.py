"""Set-up shared by the benchmarks that make loans through the real services."""

from __future__ import annotations

from sqlmodel import Session

from custody.auth.service import create_principal
from custody.config import NetworkName
from custody.db.models import KeyRole, Party, PartyKind, Role
from custody.loans.service import Context


def seat_contexts(session: Session, prefix: str, network: NetworkName) -> dict[KeyRole, Context]:
    """A bank, a miner and an arbiter party, and one principal per seat acting for it."""
    parties: dict[str, int] = {}
    for name, kind in (
        ("bank", PartyKind.bank),
        ("miner", PartyKind.miner),
        ("arbiter", PartyKind.arbiter),
    ):
        party = Party(name=f"{prefix}-{name}", kind=kind)
        session.add(party)
        session.flush()
        assert party.id is not None
        parties[name] = party.id
    ctx: dict[KeyRole, Context] = {}
    for seat, role, party_name in (
        (KeyRole.bank, Role.bank_operator, "bank"),
        (KeyRole.miner, Role.miner, "miner"),
        (KeyRole.arbiter, Role.arbiter, "arbiter"),
    ):
        principal, _ = create_principal(
            session,
            name=f"{prefix}-{seat.value}",
            role=role,
            party_id=parties[party_name],
            actor="bench",
        )
        ctx[seat] = Context(principal=principal, network=network)
    return ctx
