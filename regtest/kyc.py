"""Miners the compliance gate lets through, for the tests' worlds, the benches and the
demo: a clean registry record (a legal entity in Moscow, on the register of miners, no
flag) entered by bank staff and approved by a compliance officer through the real
service, so their loans leave `draft` as they would in production (there is no bypass)."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from custody.auth.context import Context
from custody.compliance import service as compliance
from custody.compliance.schemas import MinerRecordIn
from custody.db.models import MinerRecord, Principal
from pledge.network import NetworkName

# Published valid numbers (Sberbank's INN and OGRN): their check digits hold.
CLEAN_RECORD: dict[str, Any] = {
    "legal_form": "legal_entity",
    "inn": "7707083893",
    "ogrn": "1027700132195",
    "register_number": "RM-77-0001",
    "register_date": "2024-11-15",
    "register_status": "active",
    "region": "77",
    "monthly_energy_kwh": 50_000,
}


def approve_miner(
    session: Session,
    party_id: int,
    *,
    editor: Principal,
    officer: Principal,
    network: NetworkName = "regtest",
    **changes: Any,
) -> MinerRecord:
    """Enter a clean record for the miner party (as `editor`, bank staff) and approve it
    (as `officer`, a compliance officer), in the caller's transaction."""
    body = MinerRecordIn.model_validate({**CLEAN_RECORD, **changes})
    row = compliance.put_record(session, Context(editor, network), party_id, body)
    compliance.review(
        session,
        Context(officer, network),
        party_id,
        approve=True,
        reason="test world: registry data checked",
        digest=row.digest,
    )
    return row
