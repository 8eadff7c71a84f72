"""The console's compliance pages (issue 15): a miner's registry record with its flags,
documents and reviews, and the compliance officers' queue of records waiting for review.
Read through `custody.compliance.service`, the API's own rules."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from custody.auth.context import Context
from custody.compliance import repository
from custody.compliance import service as compliance
from custody.db.models import Role
from custody.errors import MinerRecordNotFound

LEGAL_FORMS = ("legal_entity", "individual_entrepreneur", "individual")
REGISTER_STATUSES = ("active", "suspended", "excluded")


def miner_record_page(session: Session, ctx: Context, party_id: int) -> dict[str, Any]:
    party = compliance.miner_party(session, ctx.principal, party_id)
    try:
        row = compliance.get_record(session, ctx.principal, party_id)
    except MinerRecordNotFound:
        row = None
    found = compliance.standing(session, party_id, start=compliance.today(), end=None)
    role = Role(ctx.principal.role)
    return {
        "party": party,
        "record": row,
        "standing": found,
        "documents": repository.documents_of(session, party_id),
        "can_edit": role in compliance.EDITORS,
        "can_upload": role in (*compliance.EDITORS, Role.miner),
        "can_review": role == Role.compliance_officer
        and row is not None
        and row.updated_by_id != ctx.principal.id
        and ctx.principal.id not in repository.document_uploader_ids(session, party_id)
        and all(r.reviewer_id != ctx.principal.id for r in found.reviews),
        "legal_forms": LEGAL_FORMS,
        "register_statuses": REGISTER_STATUSES,
        "document_kinds": sorted(compliance.DOCUMENT_KINDS),
        "role": role.value,
    }


def review_queue(session: Session, ctx: Context) -> list[dict[str, Any]]:
    """The records whose current content waits for a review, with their miner's name."""
    out = []
    for found in compliance.records_to_review(session, ctx.principal):
        assert found.record is not None
        party = repository.party(session, found.record.party_id)
        out.append({"standing": found, "name": party.name if party else "?"})
    return out
