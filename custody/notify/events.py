"""Which party hears of what, and which fact each event reports: one place that maps a
loan event to the parties' webhooks (queued in the caller's transaction, like its audit
event) and to its id.

An event's id is derived from the fact, never drawn at random (`event_key`):

- a deposit event from the deposit's outpoint, its epoch (`Deposit.retractions`: how
  often a reorg or the mempool took it back) and, for a confirmation and its retraction,
  the block it is in. A replay, or a reorg that leaves a deposit as it was announced,
  has the same id and is not sent again; a confirmation after a retraction, in the same
  block or another, is news (a new epoch) and is sent once;
- a loan state event from the loan's state history (`Loan.state_version`: its n-th
  state change), the ledger fact that is the change;
- a signing-request event from the request (and its transaction).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlmodel import Session

from custody.db.models import Loan, PartyKind
from custody.notify import repository
from custody.notify.outbox import enqueue

# Who is told, by seat. The bank hears everything about its loans.
AUDIENCE: dict[str, tuple[str, ...]] = {
    "deposit.seen": ("miner", "bank"),
    "deposit.confirmed": ("miner", "bank"),
    "deposit.unconfirmed": ("miner", "bank"),
    "deposit.removed": ("miner", "bank"),
    "loan.active": ("miner", "bank"),
    "loan.awaiting_deposit": ("miner", "bank"),
    "loan.margin_call": ("miner", "bank"),
    "liquidation.started": ("miner", "bank", "arbiter"),
    "liquidation.broadcast": ("miner", "bank", "arbiter"),
    "liquidation.confirmed": ("miner", "bank", "arbiter"),
    "release.ready_to_sign": ("miner", "bank"),
    "screening.blocked": ("bank",),  # never the miner: an AML finding is not told to its subject
}

# The payload fields naming the fact each event reports (with its loan). A liquidation's
# confirmation has no retraction event, so it is keyed by its transaction, not its block:
# a reorg that mines it again tells receivers nothing new.
IDENTITY: dict[str, tuple[str, ...]] = {
    "deposit.seen": ("txid", "vout", "retractions"),
    "deposit.confirmed": ("txid", "vout", "block_hash", "retractions"),
    "deposit.unconfirmed": ("txid", "vout", "block_hash", "retractions"),
    "deposit.removed": ("txid", "vout", "retractions"),
    "loan.active": ("state_version",),
    "loan.awaiting_deposit": ("state_version",),
    "loan.margin_call": ("state_version",),
    "liquidation.started": ("request_id",),
    "liquidation.broadcast": ("request_id", "txid"),
    "liquidation.confirmed": ("request_id", "txid"),
    "release.ready_to_sign": ("request_id",),
    "signature.needed": ("request_id", "seats"),
    # a stall is the run of failed steps that began at that instant
    "watcher.stalled": ("stalled_since",),
    "watcher.recovered": ("stalled_since",),
    "screening.blocked": ("decision_id", "status"),
}
# Events that report a loan's state change: their payload carries the change's number.
LOAN_STATE_EVENTS = frozenset({"loan.active", "loan.awaiting_deposit", "loan.margin_call"})


def _part(value: object) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def event_key(event_type: str, loan_id: int | None, payload: Mapping[str, Any]) -> str:
    """The fact `event_type` reports, as text: its loan and its identity fields. A missing
    field is a bug in the caller (its events would collide), so it raises KeyError."""
    parts = [f"loan={loan_id}"]
    parts += [f"{name}={_part(payload[name])}" for name in IDENTITY[event_type]]
    return "/".join(parts)


def notify_loan(
    session: Session,
    loan: Loan,
    event_type: str,
    payload: dict[str, Any],
    *,
    seats: tuple[str, ...] | None = None,
) -> None:
    """Queue `event_type` about `loan` for its parties' webhooks. A loan state event is
    sent right after its `change_state`, whose number it carries."""
    party = {
        "miner": loan.miner_party_id,
        "bank": loan.bank_party_id,
        "arbiter": loan.arbiter_party_id,
    }
    who = seats if seats is not None else AUDIENCE[event_type]
    body = {"loan_id": loan.id, **payload}
    if event_type in LOAN_STATE_EVENTS:
        body["state_version"] = loan.state_version
    enqueue(
        session,
        party_ids=[party[s] for s in who],
        event_type=event_type,
        payload=body,
        key=event_key(event_type, loan.id, body),
    )


def notify_operators(session: Session, event_type: str, payload: dict[str, Any]) -> None:
    """An event about the service itself, not one loan (the deposit watcher stalled or
    recovered): every bank's webhooks, since the bank runs the service and every loan
    it lends against waits on it."""
    enqueue(
        session,
        party_ids=repository.party_ids_of_kind(session, PartyKind.bank),
        event_type=event_type,
        payload=payload,
        key=event_key(event_type, None, payload),
    )
