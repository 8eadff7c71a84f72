"""Compliance: a miner's registry data, its evidence, the compliance officers' reviews and
the gate a loan passes to leave `draft`.

An approval is bound to the record's digest (its facts and its documents' SHA-256s,
`pledge.kyc.record_digest`): any change makes a new digest, so the earlier approvals no
longer count and the record must be approved again. A flagged record (`pledge.kyc.flags_of`:
an unregistered individual above the energy limit, a mining ban in the loan's region and
period, a register entry not active, high energy without a data centre) needs a second,
different compliance officer. The officer who last changed the record, or uploaded any of
its evidence, reviews none of it.
Every change is an audit event (`compliance.*`) in the caller's transaction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date
from enum import StrEnum

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.policy import READ_ALL, require_role
from custody.compliance import repository
from custody.compliance.schemas import MinerRecordIn, MiningBanIn
from custody.db.models import (
    ComplianceReview,
    EvidenceDocument,
    Loan,
    MinerRecord,
    MiningBan,
    Party,
    PartyKind,
    Principal,
    Role,
    as_utc,
    utcnow,
)
from custody.errors import (
    BodyTooLarge,
    CompliancePending,
    DocumentCorrupted,
    DocumentNotFound,
    MinerRecordNotFound,
    MiningBanNotFound,
    PartyKindMismatch,
    PartyNotFound,
    RecordChangedSinceReview,
    ReviewRepeated,
    SelfReview,
    UnsupportedContentType,
)
from pledge import kyc
from pledge.errors import InvalidInput

EDITORS = (Role.bank_operator, Role.compliance_officer, Role.admin)
BAN_EDITORS = (Role.compliance_officer, Role.admin)
DOCUMENT_TYPES = frozenset({"application/pdf", "image/jpeg", "image/png", "text/plain"})
DOCUMENT_KINDS = frozenset(
    {"register_extract", "energy_contract", "charter", "hosting_contract", "other"}
)
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024  # the upload route's body limit (custody.api.limits)
FACT_FIELDS = (
    "legal_form",
    "inn",
    "ogrn",
    "register_number",
    "register_date",
    "register_status",
    "region",
    "monthly_energy_kwh",
    "data_centre_name",
    "data_centre_inn",
)


@dataclass(frozen=True)
class Standing:
    """Where a miner's record stands for a period: `state` is missing, pending, approved
    or rejected (a rejection of the current content stands until the record changes)."""

    record: MinerRecord | None
    flags: list[kyc.Flag]
    needed: int
    state: str
    reviews: list[ComplianceReview]


def _actor(principal: Principal) -> str:
    return f"{principal.role}:{principal.name}"


def miner_party(session: Session, principal: Principal, party_id: int) -> Party:
    """The miner party, if the caller may see it (staff, or the miner itself); the same 404
    as for no party otherwise. A bank or arbiter party has no miner record (422)."""
    party = repository.party(session, party_id)
    own = principal.role == Role.miner and principal.party_id == party_id
    if party is None or not (principal.role in READ_ALL or own):
        raise PartyNotFound()
    if party.kind != PartyKind.miner:
        raise PartyKindMismatch(
            f"party {party_id} is a {party.kind}: only a miner has a miner record",
            field="party_id",
        )
    return party


def facts_of(row: MinerRecord) -> kyc.MinerFacts:
    return kyc.MinerFacts(
        legal_form=kyc.LegalForm(row.legal_form),
        inn=row.inn,
        ogrn=row.ogrn,
        register_number=row.register_number,
        register_date=row.register_date,
        register_status=kyc.RegisterStatus(row.register_status) if row.register_status else None,
        region=row.region,
        monthly_energy_kwh=row.monthly_energy_kwh,
        data_centre_name=row.data_centre_name,
        data_centre_inn=row.data_centre_inn,
    )


def kernel_bans(session: Session) -> list[kyc.MiningBan]:
    return [
        kyc.MiningBan(
            region=b.region,
            starts_on=b.starts_on,
            ends_on=b.ends_on,
            months=frozenset(int(m) for m in b.months.split(",") if m),
            note=b.note,
        )
        for b in repository.bans(session)
    ]


def standing(session: Session, party_id: int, *, start: date, end: date | None) -> Standing:
    """The record's flags for a loan from `start` to `end` (None: any time from `start`)
    and whether its current content has the approvals they need."""
    row = repository.record_of(session, party_id)
    if row is None:
        return Standing(record=None, flags=[], needed=1, state="missing", reviews=[])
    flags = kyc.flags_of(facts_of(row), kernel_bans(session), start=start, end=end)
    needed = kyc.approvals_needed(flags)
    reviews = repository.reviews_of(session, party_id, row.digest)
    approvers = {r.reviewer_id for r in reviews if r.decision == "approved"}
    if any(r.decision == "rejected" for r in reviews):
        state = "rejected"
    elif len(approvers) >= needed:
        state = "approved"
    else:
        state = "pending"
    return Standing(record=row, flags=flags, needed=needed, state=state, reviews=reviews)


def today() -> date:
    return utcnow().date()


def get_record(session: Session, principal: Principal, party_id: int) -> MinerRecord:
    miner_party(session, principal, party_id)
    row = repository.record_of(session, party_id)
    if row is None:
        raise MinerRecordNotFound()
    return row


def _refresh_digest(session: Session, row: MinerRecord) -> str:
    return kyc.record_digest(facts_of(row), repository.document_digests(session, row.party_id))


def put_record(session: Session, ctx: Context, party_id: int, body: MinerRecordIn) -> MinerRecord:
    """Create or replace a miner's record. Values the kernel refuses answer 422 naming the
    field, nothing stored; the same values again change nothing (no new version)."""
    miner_party(session, ctx.principal, party_id)
    require_role(ctx.principal, *EDITORS)
    facts = kyc.validate_facts(
        kyc.MinerFacts(
            legal_form=kyc.LegalForm(body.legal_form),
            inn=body.inn,
            ogrn=body.ogrn,
            register_number=body.register_number,
            register_date=body.register_date,
            register_status=kyc.RegisterStatus(body.register_status)
            if body.register_status
            else None,
            region=body.region,
            monthly_energy_kwh=body.monthly_energy_kwh,
            data_centre_name=body.data_centre_name,
            data_centre_inn=body.data_centre_inn,
        ),
        today=today(),
    )
    row = repository.record_of(session, party_id)
    after = {name: getattr(facts, name) for name in FACT_FIELDS}
    after = {k: (v.value if isinstance(v, StrEnum) else v) for k, v in after.items()}
    if row is None:
        row = MinerRecord(
            party_id=party_id,
            digest="",
            version=0,
            updated_by=ctx.actor,
            **after,
        )
        before: dict[str, object] = {}
    else:
        before = {name: getattr(row, name) for name in FACT_FIELDS}
    changed = [name for name in FACT_FIELDS if before.get(name) != after[name]]
    if row.id is not None and not changed:
        return row
    for name in changed:
        setattr(row, name, after[name])
    row.version += 1
    row.updated_by = ctx.actor
    row.updated_by_id = ctx.principal.id
    row.updated_at = utcnow()
    row.digest = _refresh_digest(session, row)
    session.add(row)
    session.flush()

    def shown(value: object) -> object:
        return value.isoformat() if isinstance(value, date) else value

    record(
        session,
        actor=ctx.actor,
        action="compliance.record.changed",
        data={
            "party_id": party_id,
            "version": row.version,
            "digest": row.digest,
            "changed": {
                name: {"before": shown(before.get(name)), "after": shown(after[name])}
                for name in changed
            },
        },
    )
    return row


def upload_document(
    session: Session,
    ctx: Context,
    party_id: int,
    *,
    kind: str,
    content_type: str | None,
    filename: str | None,
    content: bytes,
) -> EvidenceDocument:
    """Store one evidence document (staff, or the miner its own). A record that has it
    gets a new digest: its approvals no longer count."""
    miner_party(session, ctx.principal, party_id)
    require_role(ctx.principal, *EDITORS, Role.miner)
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in DOCUMENT_TYPES:
        raise UnsupportedContentType(
            f"a document is one of {', '.join(sorted(DOCUMENT_TYPES))}, not {media or 'untyped'}"
        )
    if kind not in DOCUMENT_KINDS:
        raise InvalidInput(f"kind is one of {', '.join(sorted(DOCUMENT_KINDS))}", field="kind")
    if not content:
        raise InvalidInput("the document is empty", field="body")
    if len(content) > MAX_DOCUMENT_BYTES:
        raise BodyTooLarge(f"a document is at most {MAX_DOCUMENT_BYTES} bytes")
    doc = EvidenceDocument(
        party_id=party_id,
        kind=kind,
        content_type=media,
        filename=filename,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        content=content,
        uploaded_by=ctx.actor,
        uploaded_by_id=ctx.principal.id,
    )
    session.add(doc)
    session.flush()
    row = repository.record_of(session, party_id)
    if row is not None:
        row.digest = _refresh_digest(session, row)
        row.version += 1
        row.updated_at = utcnow()
        session.add(row)
    record(
        session,
        actor=ctx.actor,
        action="compliance.document.uploaded",
        data={
            "party_id": party_id,
            "document_id": doc.id,
            "kind": kind,
            "content_type": media,
            "size": doc.size,
            "sha256": doc.sha256,
            "record_digest": row.digest if row is not None else None,
        },
    )
    return doc


def list_documents(session: Session, principal: Principal, party_id: int) -> list[EvidenceDocument]:
    miner_party(session, principal, party_id)
    return repository.documents_of(session, party_id)


def read_document(
    session: Session, principal: Principal, party_id: int, document_id: int
) -> EvidenceDocument:
    """One document with its bytes, checked against the SHA-256 taken at upload."""
    miner_party(session, principal, party_id)
    doc = repository.document(session, document_id)
    if doc is None or doc.party_id != party_id:
        raise DocumentNotFound()
    if hashlib.sha256(doc.content).hexdigest() != doc.sha256:
        raise DocumentCorrupted(f"document {document_id} no longer matches its SHA-256")
    return doc


def review(
    session: Session, ctx: Context, party_id: int, *, approve: bool, reason: str, digest: str
) -> ComplianceReview:
    """A compliance officer approves or rejects the record's content they looked at
    (`digest`); refused if it changed since, if they changed it, or if they reviewed it."""
    miner_party(session, ctx.principal, party_id)
    require_role(ctx.principal, Role.compliance_officer)
    row = repository.record_of(session, party_id)
    if row is None:
        raise MinerRecordNotFound()
    if digest != row.digest:
        raise RecordChangedSinceReview(
            f"the record is now version {row.version} (digest {row.digest}): review that",
            field="digest",
        )
    if row.updated_by_id == ctx.principal.id:
        raise SelfReview("you changed this record last: another compliance officer reviews it")
    if ctx.principal.id in repository.document_uploader_ids(session, party_id):
        raise SelfReview("you uploaded evidence of this record: another officer reviews it")
    current = standing(session, party_id, start=today(), end=None)
    if any(r.reviewer_id == ctx.principal.id for r in current.reviews):
        raise ReviewRepeated(
            "you already reviewed this content of the record: a second approval must come "
            "from a different compliance officer"
        )
    decision = "approved" if approve else "rejected"
    row_review = ComplianceReview(
        party_id=party_id,
        digest=digest,
        decision=decision,
        reason=reason,
        flags=",".join(f.code for f in current.flags),
        reviewer=ctx.actor,
        reviewer_id=ctx.principal.id or 0,
    )
    session.add(row_review)
    try:
        session.flush()
    except IntegrityError as exc:  # the same officer's concurrent second review
        raise ReviewRepeated("you already reviewed this content of the record") from exc
    record(
        session,
        actor=ctx.actor,
        action=f"compliance.review.{decision}",
        decision=decision,
        reason=reason,
        data={
            "party_id": party_id,
            "digest": digest,
            "version": row.version,
            "flags": [f.code for f in current.flags],
        },
    )
    return row_review


def ensure_cleared(session: Session, loan: Loan) -> None:
    """The gate out of `draft`: the loan's miner's current record approved, by two
    different officers if it is flagged for this loan's period; else CompliancePending."""
    start = today()
    maturity = as_utc(loan.maturity_at)
    found = standing(session, loan.miner_party_id, start=start, end=maturity.date())
    if found.state == "approved":
        return
    why = {
        "missing": "the miner has no compliance record",
        "rejected": "a compliance officer rejected the miner's record",
        "pending": (
            f"the miner's record needs {found.needed} compliance officer approval(s) of its "
            f"current content"
            + (
                " (it is high-risk: " + "; ".join(f.reason for f in found.flags) + ")"
                if found.flags
                else ""
            )
        ),
    }[found.state]
    raise CompliancePending(
        f"loan {loan.id} cannot leave draft: {why}",
        state=found.state,
        flags=[{"code": f.code, "reason": f.reason} for f in found.flags],
    )


def records_to_review(session: Session, principal: Principal) -> list[Standing]:
    """Miners' records whose current content waits for a review (the console's queue)."""
    require_role(principal, *READ_ALL)
    out = []
    for row in repository.miner_records(session):
        found = standing(session, row.party_id, start=today(), end=None)
        if found.state == "pending":
            out.append(found)
    return out


def list_bans(session: Session, principal: Principal) -> list[MiningBan]:
    require_role(principal, *READ_ALL)
    return repository.bans(session)


def create_ban(session: Session, ctx: Context, body: MiningBanIn) -> MiningBan:
    require_role(ctx.principal, *BAN_EDITORS)
    if body.region not in kyc.REGIONS:
        raise InvalidInput("not the code of a subject of the Russian Federation", field="region")
    if body.ends_on is not None and body.ends_on < body.starts_on:
        raise InvalidInput("a ban ends on or after the day it starts", field="ends_on")
    ban = MiningBan(
        region=body.region,
        starts_on=body.starts_on,
        ends_on=body.ends_on,
        months=",".join(str(m) for m in sorted(set(body.months))),
        note=body.note or "",
        created_by=ctx.actor,
    )
    session.add(ban)
    session.flush()
    record(
        session,
        actor=ctx.actor,
        action="compliance.ban.created",
        data={
            "ban_id": ban.id,
            "region": ban.region,
            "starts_on": ban.starts_on.isoformat(),
            "ends_on": ban.ends_on.isoformat() if ban.ends_on else None,
            "months": ban.months,
            "note": ban.note,
        },
    )
    return ban


def delete_ban(session: Session, ctx: Context, ban_id: int) -> None:
    require_role(ctx.principal, *BAN_EDITORS)
    ban = repository.ban(session, ban_id)
    if ban is None:
        raise MiningBanNotFound()
    repository.remove(session, ban)
    record(
        session,
        actor=ctx.actor,
        action="compliance.ban.deleted",
        data={"ban_id": ban_id, "region": ban.region, "note": ban.note},
    )
