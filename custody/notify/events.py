"""Which party hears of what: one place that maps a loan event to the parties'
webhooks (queued in the caller's transaction, like its audit event)."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from custody.db.models import Loan, PartyKind
from custody.notify import repository
from custody.notify.outbox import enqueue

# Who is told, by seat. The bank hears everything about its loans.
AUDIENCE: dict[str, tuple[str, ...]] = {
    "deposit.seen": ("miner", "bank"),
    "deposit.confirmed": ("miner", "bank"),
    "loan.active": ("miner", "bank"),
    "loan.margin_call": ("miner", "bank"),
    "liquidation.started": ("miner", "bank", "arbiter"),
    "liquidation.broadcast": ("miner", "bank", "arbiter"),
    "liquidation.confirmed": ("miner", "bank", "arbiter"),
    "release.ready_to_sign": ("miner", "bank"),
}


def notify_loan(
    session: Session,
    loan: Loan,
    event_type: str,
    payload: dict[str, Any],
    *,
    seats: tuple[str, ...] | None = None,
) -> None:
    party = {
        "miner": loan.miner_party_id,
        "bank": loan.bank_party_id,
        "arbiter": loan.arbiter_party_id,
    }
    who = seats if seats is not None else AUDIENCE[event_type]
    enqueue(
        session,
        party_ids=[party[s] for s in who],
        event_type=event_type,
        payload={"loan_id": loan.id, **payload},
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
    )
