"""The append-only, hash-chained audit log.

Each row's hash covers its own fields and the previous row's hash, so editing,
inserting, reordering or deleting rows breaks the chain at a findable place.
Appends are serialised (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-level
advisory lock) so two writers can never chain onto the same parent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlmodel import Session, col, select

from custody.db.models import AuditEvent
from custody.db.session import is_postgres

GENESIS_HASH = "0" * 64
_PG_AUDIT_LOCK = 0x5C0A_7D17  # advisory lock key reserved for the audit chain


def _canonical_time(at: datetime) -> str:
    if at.tzinfo is None:  # SQLite hands back naive datetimes for UTC values
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def event_hash(event: AuditEvent) -> str:
    payload = {
        "id": event.id,
        "at": _canonical_time(event.at),
        "actor": event.actor,
        "action": event.action,
        "loan_id": event.loan_id,
        "request_id": event.request_id,
        "decision": event.decision,
        "reason": event.reason,
        "data": event.data,
        "prev_hash": event.prev_hash,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    loan_id: int | None = None,
    request_id: int | None = None,
    decision: str | None = None,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event inside the caller's transaction (it commits or rolls back with it)."""
    if is_postgres(session):
        session.exec(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=_PG_AUDIT_LOCK))  # type: ignore[call-overload]
    last = session.exec(select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(1)).first()
    event = AuditEvent(
        id=(last.id + 1) if last else 1,
        at=datetime.now(UTC),
        actor=actor,
        action=action,
        loan_id=loan_id,
        request_id=request_id,
        decision=decision,
        reason=reason,
        data=json.dumps(data or {}, sort_keys=True, separators=(",", ":"), default=str),
        prev_hash=last.hash if last else GENESIS_HASH,
        hash="",
    )
    event.hash = event_hash(event)
    session.add(event)
    session.flush()
    return event


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first_broken_id: int | None = None
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "first_broken_id": self.first_broken_id,
            "problem": self.problem,
        }


def verify_chain(session: Session, batch: int = 5000) -> ChainReport:
    """Recompute every link; report the first row whose id, parent or hash is wrong."""
    expected_prev = GENESIS_HASH
    expected_id = 1
    count = 0
    last_id = 0
    while True:
        rows = session.exec(
            select(AuditEvent)
            .where(col(AuditEvent.id) > last_id)
            .order_by(col(AuditEvent.id))
            .limit(batch)
        ).all()
        if not rows:
            return ChainReport(ok=True, events=count)
        for row in rows:
            if row.id != expected_id:
                return ChainReport(
                    False, count, expected_id, f"event {expected_id} is missing (next is {row.id})"
                )
            if row.prev_hash != expected_prev:
                return ChainReport(False, count, row.id, "previous-hash link does not match")
            if event_hash(row) != row.hash:
                return ChainReport(False, count, row.id, "content does not match its hash")
            expected_prev = row.hash
            expected_id += 1
            count += 1
            last_id = row.id
