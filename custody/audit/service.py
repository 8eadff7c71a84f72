"""The append-only, hash-chained audit log.

Each row's hash covers its own fields and the previous row's hash, so editing,
inserting, reordering or deleting rows breaks the chain at a findable place.
Appends are serialised (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-level
advisory lock) so two writers can never chain onto the same parent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import insert, text
from sqlalchemy.orm import Session as SASession
from sqlalchemy.orm import SessionTransaction
from sqlmodel import Session, col, select

from custody.db.models import AuditEvent
from custody.db.session import is_postgres

GENESIS_HASH = "0" * 64
_PG_AUDIT_LOCK = 0x5C0A_7D17  # advisory lock key reserved for the audit chain


def _canonical_time(at: datetime) -> str:
    if at.tzinfo is None:  # SQLite hands back naive datetimes for UTC values
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _hash_fields(fields: dict[str, Any]) -> str:
    payload = {
        "id": fields["id"],
        "at": _canonical_time(fields["at"]),
        "actor": fields["actor"],
        "action": fields["action"],
        "loan_id": fields["loan_id"],
        "request_id": fields["request_id"],
        "decision": fields["decision"],
        "reason": fields["reason"],
        "data": fields["data"],
        "prev_hash": fields["prev_hash"],
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def event_hash(event: AuditEvent) -> str:
    return _hash_fields(event.model_dump())


@dataclass
class _Pending:
    """This transaction's view of the chain: its tail, and events not yet written."""

    tail_id: int
    tail_hash: str
    rows: list[dict[str, Any]] = field(default_factory=list)


_PENDING = "custody.audit.pending"


@sa_event.listens_for(SASession, "before_commit")
def _write_pending(session: SASession) -> None:
    pending: _Pending | None = session.info.get(_PENDING)
    if pending is not None and pending.rows:
        session.execute(insert(AuditEvent), pending.rows)
        pending.rows = []


@sa_event.listens_for(SASession, "after_transaction_end")
def _forget_pending(session: SASession, transaction: SessionTransaction) -> None:
    # The tail is only ours while this transaction holds the lock; a rollback drops
    # the buffered events with everything else. Flushes end sub-transactions: ignore those.
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


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
) -> None:
    """Append one event inside the caller's transaction: written just before it commits,
    dropped if it rolls back. The first event of a transaction takes the chain's lock
    and reads its tail; later ones chain in memory (one INSERT for all at commit)."""
    pending: _Pending | None = session.info.get(_PENDING)
    if pending is None:
        if is_postgres(session):
            session.exec(  # type: ignore[call-overload]
                text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=_PG_AUDIT_LOCK)
            )
        last = session.exec(
            select(AuditEvent.id, AuditEvent.hash).order_by(col(AuditEvent.id).desc()).limit(1)
        ).first()
        pending = _Pending(last[0], last[1]) if last else _Pending(0, GENESIS_HASH)
        session.info[_PENDING] = pending
    row: dict[str, Any] = {
        "id": pending.tail_id + 1,
        "at": datetime.now(UTC),
        "actor": actor,
        "action": action,
        "loan_id": loan_id,
        "request_id": request_id,
        "decision": decision,
        "reason": reason,
        "data": json.dumps(data or {}, sort_keys=True, separators=(",", ":"), default=str),
        "prev_hash": pending.tail_hash,
    }
    row["hash"] = _hash_fields(row)
    pending.rows.append(row)
    pending.tail_id, pending.tail_hash = row["id"], row["hash"]


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
