"""What the webhooks told against what the ledger says.

`assert_outbox_tells_the_ledger` replays one webhook's outbox rows, in order, as each
deposit's and each loan's story, and checks that the story ends exactly where the
ledger is: every deposit in its table state, block and epoch (`Deposit.retractions`), with
one retraction event per epoch it has closed; every loan event one of its state history's
changes (the `loan.state_changed` audit rows), each of those that receivers hear of
(`HEARD`) told once. It reads only tables, never the code that wrote them, so a missed,
doubled or out-of-order event fails it.

`snapshot_ledger` / `restore_ledger` put the ledger's rows back as they were (the outbox
and the audit log stay): a second watcher stepping from there replays what the first
one did, as two writers that both started from one state would.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from custody.db.models import (
    AuditEvent,
    ChainBlock,
    ChainCursor,
    Deposit,
    DepositState,
    Loan,
    Outbox,
    Webhook,
)
from custody.db.session import transaction

# (from, to) of the state changes receivers are told of, and the event that tells them.
HEARD: dict[tuple[str | None, str], str] = {
    ("awaiting_deposit", "active"): "loan.active",
    ("active", "awaiting_deposit"): "loan.awaiting_deposit",
    ("active", "margin_call"): "loan.margin_call",
}
LOAN_STATE_EVENTS = frozenset(HEARD.values())


@dataclass(frozen=True)
class Told:
    """One outbox row of one webhook."""

    row_id: int
    event_id: str
    type: str
    data: dict[str, Any]


def told(engine: Engine, webhook_id: int) -> list[Told]:
    with Session(engine) as session:
        rows = session.exec(
            select(Outbox).where(Outbox.webhook_id == webhook_id).order_by(col(Outbox.id))
        ).all()
        return [Told(r.id or 0, r.event_id, r.event_type, json.loads(r.payload)) for r in rows]


def kinds(engine: Engine, webhook_id: int) -> Counter[str]:
    """How many rows of each event type the webhook has."""
    return Counter(t.type for t in told(engine, webhook_id))


@dataclass
class _Story:
    """A deposit as its events tell it."""

    state: str | None = None  # None until seen
    epoch: int = 0
    confirmed_in: str | None = None


def _fold(events: list[Told], where: str) -> _Story:
    story = _Story()
    for t in events:
        what = f"{where}: {t.type} (retractions={t.data['retractions']}) after {story}"
        assert t.data["retractions"] == story.epoch, f"{what}: wrong epoch"
        if t.type == "deposit.seen":
            assert story.state in (None, "removed"), f"{what}: seen twice"
            story.state = "pending"
        elif t.type == "deposit.confirmed":
            assert story.state == "pending", f"{what}: confirmed twice, or unseen"
            story.state, story.confirmed_in = "confirmed", t.data["block_hash"]
        elif t.type == "deposit.unconfirmed":
            assert story.state == "confirmed", f"{what}: retracts no confirmation"
            assert t.data["block_hash"] == story.confirmed_in, f"{what}: another block's"
            story.state, story.confirmed_in, story.epoch = "pending", None, story.epoch + 1
        elif t.type == "deposit.removed":
            assert story.state == "pending", f"{what}: removes no pending deposit"
            story.state, story.epoch = "removed", story.epoch + 1
        else:
            raise AssertionError(f"{where}: unexpected {t.type}")
    return story


def _deposit_key(t: Told) -> tuple[str, int]:
    return (str(t.data["txid"]), int(t.data["vout"]))


def assert_outbox_tells_the_ledger(engine: Engine, webhook_id: int) -> Counter[str]:
    """Fail unless the webhook's outbox tells the story of its party's loans that the
    deposits table and the loans' state history tell. Returns its rows' kinds."""
    events = told(engine, webhook_id)
    assert len({t.event_id for t in events}) == len(events), "an event queued twice"
    with Session(engine) as session:
        hook = session.get(Webhook, webhook_id)
        assert hook is not None and hook.events == "*", "compare a webhook that hears all"
        loans = {
            loan.id: loan
            for loan in session.exec(
                select(Loan).where(
                    (Loan.bank_party_id == hook.party_id)
                    | (Loan.miner_party_id == hook.party_id)
                    | (Loan.arbiter_party_id == hook.party_id)
                )
            ).all()
        }
        deposits = session.exec(select(Deposit).where(col(Deposit.loan_id).in_(list(loans)))).all()
        history = session.exec(
            select(AuditEvent)
            .where(
                col(AuditEvent.loan_id).in_(list(loans)),
                AuditEvent.action == "loan.state_changed",
            )
            .order_by(col(AuditEvent.id))
        ).all()

    by_deposit: dict[tuple[str, int], list[Told]] = {}
    for t in events:
        if t.type.startswith("deposit."):
            by_deposit.setdefault(_deposit_key(t), []).append(t)
    known = {(d.txid, d.vout): d for d in deposits}
    assert set(by_deposit) <= set(known), f"events of no deposit: {set(by_deposit) - set(known)}"
    for dep in deposits:
        where = f"deposit {dep.txid}:{dep.vout} ({dep.state}, loan {dep.loan_id})"
        mine = by_deposit.get((dep.txid, dep.vout), [])
        assert all(t.data["loan_id"] == dep.loan_id for t in mine), f"{where}: another loan's"
        story = _fold(mine, where)
        assert story.epoch == dep.retractions, f"{where}: {story.epoch} retractions told"
        if dep.state == DepositState.confirmed:
            assert (story.state, story.confirmed_in) == ("confirmed", dep.block_hash), where
        elif dep.state == DepositState.spent:  # not an event: told as it was before
            assert story.state in ("pending", "confirmed"), f"{where}: told {story.state}"
        else:
            assert story.state == str(dep.state), f"{where}: told {story.state}"

    # Each state change is one fact, however often a replay wrote its audit row.
    changes: dict[tuple[int, int], tuple[str, str]] = {}
    for row in history:
        data = json.loads(row.data)
        assert row.loan_id is not None
        change = (data["from"], data["to"])
        earlier = changes.setdefault((row.loan_id, int(data["state_version"])), change)
        assert earlier == change, f"loan {row.loan_id} change {data['state_version']} differs"
    expected = sorted(
        (HEARD[change], loan_id, version)
        for (loan_id, version), change in changes.items()
        if change in HEARD
    )
    told_loans = [
        (t.type, int(t.data["loan_id"]), int(t.data["state_version"]))
        for t in events
        if t.type in LOAN_STATE_EVENTS
    ]
    assert sorted(told_loans) == expected, f"loan events {told_loans}, history {expected}"
    for loan_id in loans:  # in the order they happened
        versions = [v for _, lid, v in told_loans if lid == loan_id]
        assert versions == sorted(versions), f"loan {loan_id}: events out of order"
    return Counter(t.type for t in events)


# -- replays -----------------------------------------------------------------------------

_LEDGER = (Deposit, Loan, ChainCursor, ChainBlock)
Snapshot = dict[str, list[dict[str, Any]]]


def snapshot_ledger(engine: Engine) -> Snapshot:
    with Session(engine) as session:
        return {
            model.__name__: [row.model_dump() for row in session.exec(select(model)).all()]
            for model in _LEDGER
        }


def restore_ledger(engine: Engine, snapshot: Snapshot) -> None:
    """The deposits, loans, cursor and applied blocks as they were at `snapshot`."""
    with transaction(engine) as session:
        for model in (Deposit, ChainBlock):  # rows made since go
            keep = {tuple(row[k] for k in _key(model)) for row in snapshot[model.__name__]}
            for row in session.exec(select(model)).all():
                if tuple(getattr(row, k) for k in _key(model)) not in keep:
                    session.delete(row)
        session.flush()
        for table in _LEDGER:
            for values in snapshot[table.__name__]:
                session.merge(table(**values))


def _key(model: type[Deposit] | type[ChainBlock]) -> tuple[str, ...]:
    return ("id",) if model is Deposit else ("height",)
