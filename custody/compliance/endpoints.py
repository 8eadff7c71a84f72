"""Compliance endpoints: a miner's registry record, its evidence documents, the compliance
officers' reviews, and the bank's table of regional mining bans."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from sqlmodel import Session

from custody.api.deps import ContextDep, PartyId, PrincipalDep, RawBodyDep, SessionDep
from custody.api.errors import BODY_ERRORS, errors_for
from custody.compliance import repository
from custody.compliance import service as compliance
from custody.compliance.schemas import (
    DocumentKind,
    DocumentOut,
    FlagOut,
    MinerRecordIn,
    MinerRecordOut,
    MiningBanIn,
    MiningBanOut,
    ReviewIn,
    ReviewOut,
)
from custody.db.models import ComplianceReview, EvidenceDocument, MinerRecord, MiningBan
from custody.errors import (
    DocumentCorrupted,
    DocumentNotFound,
    MinerRecordNotFound,
    MiningBanNotFound,
    PartyKindMismatch,
    PartyNotFound,
    RecordChangedSinceReview,
    ReviewRepeated,
    RoleNotAllowed,
    SelfReview,
)
from custody.schemas import PathId, Text
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")

DocumentId = Annotated[int, Path(), PathId(lambda _: DocumentNotFound())]
BanId = Annotated[int, Path(), PathId(lambda _: MiningBanNotFound())]
_PARTY = (NotAuthenticated, InvalidInput, PartyNotFound, PartyKindMismatch)

_DOCUMENT_UPLOAD: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The document's bytes as they are (PDF, JPEG, PNG or plain text), "
        "its type in `Content-Type`.",
        "content": {
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in sorted(compliance.DOCUMENT_TYPES)
        },
    }
}


def record_out(session: Session, row: MinerRecord) -> MinerRecordOut:
    found = compliance.standing(session, row.party_id, start=compliance.today(), end=None)
    return MinerRecordOut(
        party_id=row.party_id,
        legal_form=row.legal_form,
        inn=row.inn,
        ogrn=row.ogrn,
        register_number=row.register_number,
        register_date=row.register_date,
        register_status=row.register_status,
        region=row.region,
        monthly_energy_kwh=row.monthly_energy_kwh,
        data_centre_name=row.data_centre_name,
        data_centre_inn=row.data_centre_inn,
        version=row.version,
        digest=row.digest,
        updated_by=row.updated_by,
        updated_at=row.updated_at,
        documents=[document_out(d) for d in repository.documents_of(session, row.party_id)],
        flags=[FlagOut(code=f.code, reason=f.reason) for f in found.flags],
        approvals_needed=found.needed,
        state=found.state,
        reviews=[review_out(r) for r in found.reviews],
    )


def document_out(doc: EvidenceDocument) -> DocumentOut:
    assert doc.id is not None
    return DocumentOut(
        id=doc.id,
        party_id=doc.party_id,
        kind=doc.kind,
        content_type=doc.content_type,
        filename=doc.filename,
        size=doc.size,
        sha256=doc.sha256,
        uploaded_by=doc.uploaded_by,
        uploaded_at=doc.uploaded_at,
    )


def review_out(r: ComplianceReview) -> ReviewOut:
    assert r.id is not None
    return ReviewOut(
        id=r.id,
        decision=r.decision,
        reason=r.reason,
        flags=[f for f in r.flags.split(",") if f],
        reviewer=r.reviewer,
        created_at=r.created_at,
    )


def ban_out(b: MiningBan) -> MiningBanOut:
    assert b.id is not None
    return MiningBanOut(
        id=b.id,
        region=b.region,
        starts_on=b.starts_on,
        ends_on=b.ends_on,
        months=[int(m) for m in b.months.split(",") if m],
        note=b.note,
        created_by=b.created_by,
    )


@router.put(
    "/parties/{party_id}/miner-record",
    tags=["compliance"],
    responses=errors_for(*_PARTY, RoleNotAllowed, *BODY_ERRORS),
)
def put_miner_record(
    party_id: PartyId, body: MinerRecordIn, session: SessionDep, ctx: ContextDep
) -> MinerRecordOut:
    """Enter or correct a miner's registry data (bank operators, compliance officers,
    admins). A change voids the record's approvals: it must be reviewed again."""
    return record_out(session, compliance.put_record(session, ctx, party_id, body))


@router.get(
    "/parties/{party_id}/miner-record",
    tags=["compliance"],
    responses=errors_for(*_PARTY, MinerRecordNotFound),
)
def get_miner_record(
    party_id: PartyId, session: SessionDep, principal: PrincipalDep
) -> MinerRecordOut:
    """The record, its documents, its flags and the reviews of its current content (staff,
    and the miner its own)."""
    return record_out(session, compliance.get_record(session, principal, party_id))


@router.post(
    "/parties/{party_id}/miner-record/reviews",
    status_code=201,
    tags=["compliance"],
    responses=errors_for(
        *_PARTY,
        RoleNotAllowed,
        MinerRecordNotFound,
        RecordChangedSinceReview,
        SelfReview,
        ReviewRepeated,
        *BODY_ERRORS,
    ),
)
def review_miner_record(
    party_id: PartyId, body: ReviewIn, session: SessionDep, ctx: ContextDep
) -> MinerRecordOut:
    """A compliance officer approves or rejects the content they looked at (`digest`)."""
    compliance.review(
        session,
        ctx,
        party_id,
        approve=body.decision == "approve",
        reason=body.reason,
        digest=body.digest,
    )
    return record_out(session, compliance.get_record(session, ctx.principal, party_id))


@router.post(
    "/parties/{party_id}/documents",
    status_code=201,
    tags=["compliance"],
    openapi_extra=_DOCUMENT_UPLOAD,
    responses=errors_for(*_PARTY, RoleNotAllowed, *BODY_ERRORS),
)
def upload_document(
    party_id: PartyId,
    request: Request,
    raw: RawBodyDep,
    session: SessionDep,
    ctx: ContextDep,
    kind: Annotated[DocumentKind, Query()] = "other",
    filename: Annotated[str | None, Query(), Text(200)] = None,
) -> DocumentOut:
    """Upload one evidence document (staff, or the miner its own), at most 4 MiB; its
    SHA-256 is kept and checked whenever it is read back."""
    doc = compliance.upload_document(
        session,
        ctx,
        party_id,
        kind=kind,
        content_type=request.headers.get("content-type"),
        filename=filename,
        content=raw,
    )
    return document_out(doc)


@router.get(
    "/parties/{party_id}/documents",
    tags=["compliance"],
    responses=errors_for(*_PARTY),
)
def list_documents(
    party_id: PartyId, session: SessionDep, principal: PrincipalDep
) -> list[DocumentOut]:
    return [document_out(d) for d in compliance.list_documents(session, principal, party_id)]


@router.get(
    "/parties/{party_id}/documents/{document_id}",
    tags=["compliance"],
    responses={
        200: {
            "description": "The document's bytes, as uploaded (checked against its SHA-256).",
            "content": {
                m: {"schema": {"type": "string", "format": "binary"}}
                for m in sorted(compliance.DOCUMENT_TYPES)
            },
        },
        **errors_for(*_PARTY, DocumentNotFound, DocumentCorrupted),
    },
)
def get_document(
    party_id: PartyId, document_id: DocumentId, session: SessionDep, principal: PrincipalDep
) -> Response:
    doc = compliance.read_document(session, principal, party_id, document_id)
    return Response(
        doc.content,
        media_type=doc.content_type,
        headers={
            "Content-Disposition": f'attachment; filename="document-{document_id}"',
            "X-Content-SHA256": doc.sha256,
        },
    )


@router.get(
    "/compliance/mining-bans",
    tags=["compliance"],
    responses=errors_for(NotAuthenticated, RoleNotAllowed, InvalidInput),
)
def list_mining_bans(session: SessionDep, principal: PrincipalDep) -> list[MiningBanOut]:
    """The regions where the bank holds mining banned (staff read; flags use them)."""
    return [ban_out(b) for b in compliance.list_bans(session, principal)]


@router.post(
    "/compliance/mining-bans",
    status_code=201,
    tags=["compliance"],
    responses=errors_for(NotAuthenticated, RoleNotAllowed, InvalidInput, *BODY_ERRORS),
)
def create_mining_ban(body: MiningBanIn, session: SessionDep, ctx: ContextDep) -> MiningBanOut:
    """Add a regional ban (compliance officers, admins)."""
    return ban_out(compliance.create_ban(session, ctx, body))


@router.delete(
    "/compliance/mining-bans/{ban_id}",
    status_code=204,
    tags=["compliance"],
    responses=errors_for(NotAuthenticated, RoleNotAllowed, InvalidInput, MiningBanNotFound),
)
def delete_mining_ban(ban_id: BanId, session: SessionDep, ctx: ContextDep) -> Response:
    compliance.delete_ban(session, ctx, ban_id)
    return Response(status_code=204)
