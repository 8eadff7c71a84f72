"""The compliance queries. Who may see or change what is decided in `service.py`."""

from __future__ import annotations

from sqlalchemy.orm import defer
from sqlmodel import Session, col, select

from custody.db.models import (
    ComplianceReview,
    EvidenceDocument,
    MinerRecord,
    MiningBan,
    Party,
    PartyKind,
)


def party(session: Session, party_id: int) -> Party | None:
    return session.get(Party, party_id)


def record_of(session: Session, party_id: int) -> MinerRecord | None:
    return session.exec(select(MinerRecord).where(MinerRecord.party_id == party_id)).first()


def documents_of(session: Session, party_id: int) -> list[EvidenceDocument]:
    """A party's documents in upload order, without their bytes (up to 4 MiB each: a
    listing shows the digests; `document` reads one whole)."""
    return list(
        session.exec(
            select(EvidenceDocument)
            .options(defer(EvidenceDocument.content))  # type: ignore[arg-type]
            .where(EvidenceDocument.party_id == party_id)
            .order_by(col(EvidenceDocument.id))
        ).all()
    )


def document_digests(session: Session, party_id: int) -> list[str]:
    """The SHA-256 of each of a party's documents (no bytes read)."""
    return list(
        session.exec(
            select(EvidenceDocument.sha256).where(EvidenceDocument.party_id == party_id)
        ).all()
    )


def document(session: Session, document_id: int) -> EvidenceDocument | None:
    return session.get(EvidenceDocument, document_id)


def reviews_of(session: Session, party_id: int, digest: str) -> list[ComplianceReview]:
    """The reviews of one content of a party's record, oldest first."""
    return list(
        session.exec(
            select(ComplianceReview)
            .where(ComplianceReview.party_id == party_id, ComplianceReview.digest == digest)
            .order_by(col(ComplianceReview.id))
        ).all()
    )


def bans(session: Session) -> list[MiningBan]:
    return list(session.exec(select(MiningBan).order_by(col(MiningBan.id))).all())


def ban(session: Session, ban_id: int) -> MiningBan | None:
    return session.get(MiningBan, ban_id)


def miner_records(session: Session) -> list[MinerRecord]:
    """Every miner's record, in party order (the console's review queue filters them)."""
    return list(
        session.exec(
            select(MinerRecord)
            .join(Party, col(Party.id) == col(MinerRecord.party_id))
            .where(Party.kind == PartyKind.miner)
            .order_by(col(MinerRecord.party_id))
        ).all()
    )


def remove(session: Session, row: MiningBan) -> None:
    session.delete(row)
    session.flush()


def document_uploader_ids(session: Session, party_id: int) -> set[int]:
    """Who uploaded a party's documents (principal ids)."""
    rows = session.exec(
        select(EvidenceDocument.uploaded_by_id).where(EvidenceDocument.party_id == party_id)
    ).all()
    return {r for r in rows if r is not None}
