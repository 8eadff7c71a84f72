"""The append-only, hash-chained audit log.

Each row's hash covers its own fields and the previous row's hash, so editing,
inserting, reordering or deleting rows breaks the chain at a findable place.
Appends are serialised (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-level
advisory lock) so two writers can never chain onto the same parent. Events wait in
memory until their transaction commits, and only then take the chain's lock, read its
tail and are chained and written: on PostgreSQL unrelated writers are serialised only
for that last insert and the commit, not for their whole transaction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session as SASession
from sqlalchemy.orm import SessionTransaction
from sqlmodel import Session

from custody.audit import repository
from custody.db.models import AuditEvent
from custody.logging import current_request_id

GENESIS_HASH = "0" * 64


def _canonical_time(at: datetime) -> str:
    if at.tzinfo is None:  # SQLite hands back naive datetimes for UTC values
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _hash_fields(fields: dict[str, Any], at: str | None = None) -> str:
    """The row's hash; `at` is its time already canonical (one for a whole commit)."""
    payload = {
        "id": fields["id"],
        "at": at if at is not None else _canonical_time(fields["at"]),
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
    """This transaction's events not yet written, and once it holds the chain's lock,
    the chain's tail (the events written so far are then ours to chain onto)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    tail: tuple[int, str] | None = None


_PENDING = "custody.audit.pending"


@sa_event.listens_for(SASession, "before_commit")
def _write_pending(session: SASession) -> None:
    pending: _Pending | None = session.info.get(_PENDING)
    if pending is None or not pending.rows or session.in_nested_transaction():
        return  # a savepoint's release is not the commit: the events wait for it
    # Every other change first, so the row locks it needs are taken before the chain's
    # lock and the chain is held only for this insert and the commit itself.
    session.flush()
    if pending.tail is None:
        repository.lock_chain(session)
        pending.tail = repository.chain_tail(session) or (0, GENESIS_HASH)
    tail_id, tail_hash = pending.tail
    now = datetime.now(UTC)
    at = _canonical_time(now)
    for row in pending.rows:  # in the order they were recorded
        tail_id += 1
        row.update(id=tail_id, at=now, prev_hash=tail_hash)
        row["hash"] = tail_hash = _hash_fields(row, at)
    repository.insert_events(session, pending.rows)
    pending.rows = []
    pending.tail = (tail_id, tail_hash)


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
    """Append one event inside the caller's transaction: chained and written just before
    it commits (one INSERT for all its events), dropped if it rolls back. Written during
    an API request, its data carries that request's id (`request_id`, from the edge:
    `custody.api.metrics`), so an event can be followed to the request's log lines and
    the signer's decision; it is part of the data, hashed like the rest of it."""
    request = current_request_id()
    if request is not None and "request_id" not in (data or {}):
        data = {**(data or {}), "request_id": request}
    pending: _Pending | None = session.info.get(_PENDING)
    if pending is None:
        pending = session.info[_PENDING] = _Pending()
    pending.rows.append(
        {
            "actor": actor,
            "action": action,
            "loan_id": loan_id,
            "request_id": request_id,
            "decision": decision,
            "reason": reason,
            "data": json.dumps(data or {}, sort_keys=True, separators=(",", ":"), default=str),
        }
    )


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
        rows = repository.events_after(session, last_id, batch)
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
