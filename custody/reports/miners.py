"""What the reports say of a miner party beyond its name: the one place the miners'
registry data (custody.compliance: INN, OGRN, the register entry) reaches the reports."""

from __future__ import annotations

from sqlmodel import Session

from custody.compliance import repository as compliance
from custody.db.models import Party


def miner_inn(session: Session, party: Party) -> str:
    """The miner's INN as its registry record has it now; "" for a party with no record."""
    if party.id is None:
        return ""
    record = compliance.record_of(session, party.id)
    return record.inn if record is not None else ""
