"""What the reports say of a miner party beyond its name: the one place the miners'
registry data (issue 15, part A: INN, OGRN, the register entry) reaches the reports."""

from __future__ import annotations

from sqlmodel import Session

from custody.db.models import Party


def miner_inn(session: Session, party: Party) -> str:
    """The miner's INN as the reports print it; "" until the registry data exists (wire
    `custody.compliance`'s accessor in here, and every report has it)."""
    del session, party
    return ""
