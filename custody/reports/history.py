"""The book as it stood at a moment, replayed from the audit log: which outpoints counted as
collateral, each loan's state, what had been paid off, and the price in effect.

The audit log is the record: every change the watcher, the risk engine and the staff made
is an event written in the transaction that made it, so replaying the events up to T gives
what the service held (and what the risk engine counted) at T, whatever happened since
(a spend, a reorg, a release). Pure: the events and rows are read by `repository.py`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from pledge import debt
from pledge.amounts import kopecks_for_sats, ltv_bps


class EventLike(Protocol):
    """What the replay reads of an audit event (custody.db.models.AuditEvent)."""

    @property
    def action(self) -> str: ...
    @property
    def loan_id(self) -> int | None: ...
    @property
    def request_id(self) -> int | None: ...
    @property
    def data(self) -> str: ...


def _data(event: EventLike) -> dict[str, Any]:
    value = json.loads(event.data or "{}")
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Held:
    """One outpoint counted as a loan's collateral."""

    loan_id: int
    txid: str
    vout: int
    amount_sats: int
    block_height: int | None


@dataclass
class _Outpoint:
    loan_id: int
    amount_sats: int
    block_height: int | None = None
    confirmed: bool = False
    spent: bool = False


@dataclass
class Holdings:
    """The outpoints held per loan, and the highest block the service had seen."""

    by_loan: dict[int, list[Held]] = field(default_factory=dict)
    known_height: int = -1

    def collateral_sats(self, loan_id: int) -> int:
        return sum(h.amount_sats for h in self.by_loan.get(loan_id, []))


def holdings(events: Iterable[EventLike]) -> Holdings:
    """Fold the watcher's deposit events (in chain order): an outpoint is collateral from
    its `deposit.confirmed` until it is spent, unconfirmed, reorged or removed; an
    `unspent` (its spend orphaned) gives it back if it was confirmed."""
    outpoints: dict[tuple[str, int], _Outpoint] = {}
    known = -1
    for event in events:
        if event.loan_id is None:
            continue
        data = _data(event)
        key = (str(data.get("txid")), int(data.get("vout", 0)))
        point = outpoints.setdefault(key, _Outpoint(event.loan_id, int(data["amount_sats"])))
        height = data.get("block_height")
        action = event.action
        if action in ("deposit.mined", "deposit.confirmed"):
            point.block_height = int(height) if height is not None else point.block_height
        if action == "deposit.confirmed":
            point.confirmed = True
            confirmations = int(data.get("confirmations", 1))
            if point.block_height is not None:
                known = max(known, point.block_height + confirmations - 1)
        elif action in ("deposit.unconfirmed", "deposit.removed"):
            point.confirmed = False
        elif action == "deposit.reorged":
            point.confirmed, point.block_height = False, None
        elif action == "deposit.spent":
            point.spent = True
        elif action == "deposit.unspent":
            point.spent = False
        if point.block_height is not None:
            known = max(known, point.block_height)
    out = Holdings(known_height=known)
    for (txid, vout), point in outpoints.items():
        if point.confirmed and not point.spent:
            out.by_loan.setdefault(point.loan_id, []).append(
                Held(point.loan_id, txid, vout, point.amount_sats, point.block_height)
            )
    return out


def states(events: Iterable[EventLike]) -> dict[int, str]:
    """Each loan's state after these `loan.created` / `loan.state_changed` events."""
    out: dict[int, str] = {}
    for event in events:
        if event.loan_id is None:
            continue
        data = _data(event)
        if event.action == "loan.created":
            out[event.loan_id] = str(data.get("state", "draft"))
        elif event.action == "loan.state_changed":
            out[event.loan_id] = str(data["to"])
    return out


def credits(events: Iterable[EventLike], request_credits: Mapping[int, int]) -> dict[int, int]:
    """Kopecks paid off per loan by these events: repayments the signer recorded, and
    partial liquidations while mined (`request_credits`: each request's credit, from its
    evidence, as `signing.chain_events.mined` applies it)."""
    out: dict[int, int] = {}
    for event in events:
        if event.loan_id is None:
            continue
        data = _data(event)
        amount = 0
        if event.action == "loan.repayment_recorded" and data.get("credited"):
            amount = int(data.get("amount_kopecks", 0))
        elif event.action == "signing_request.confirmed" and event.request_id is not None:
            amount = request_credits.get(event.request_id, 0)
        elif event.action == "signing_request.unconfirmed" and event.request_id is not None:
            amount = -request_credits.get(event.request_id, 0)
        out[event.loan_id] = out.get(event.loan_id, 0) + amount
    return out


@dataclass(frozen=True)
class PriceAt:
    """A BTC/RUB price, who gave it, and since when the service used it."""

    price_rub_per_btc: Decimal
    source: str
    since: datetime


def manual_price(price_id: int | None, price: str, confirmed_at: datetime) -> PriceAt:
    """A confirmed manual price, named as the risk engine's median names it (`manual#12`)."""
    return PriceAt(Decimal(price), f"manual#{price_id}", confirmed_at)


def evidence_price(event: EventLike, at: datetime) -> PriceAt | None:
    """The price a risk pass recorded with a state change (its evidence)."""
    data = _data(event)
    if "price_rub_per_btc" not in data:
        return None
    return PriceAt(Decimal(str(data["price_rub_per_btc"])), str(data.get("price_source")), at)


def latest(*prices: PriceAt | None) -> PriceAt | None:
    """The price that took effect last."""
    known = [p for p in prices if p is not None]
    return max(known, key=lambda p: p.since) if known else None


@dataclass(frozen=True)
class Valuation:
    collateral_sats: int
    debt_kopecks: int
    value_kopecks: int | None  # None without a price
    ltv_bps: int | None  # None without a price or without collateral


class LoanTerms(Protocol):
    principal_kopecks: int
    interest_rate_bps: int
    created_at: datetime


def value(
    loan: LoanTerms, at: datetime, collateral_sats: int, credited: int, price: PriceAt | None
) -> Valuation:
    """Debt, collateral value and LTV at `at` by the kernel's rules, the risk engine's."""
    owed = debt.outstanding_debt_kopecks(
        loan.principal_kopecks, loan.interest_rate_bps, loan.created_at, at, credited
    )
    if price is None:
        return Valuation(collateral_sats, owed, None, None)
    worth = kopecks_for_sats(collateral_sats, price.price_rub_per_btc)
    ltv = ltv_bps(owed, collateral_sats, price.price_rub_per_btc) if collateral_sats > 0 else None
    return Valuation(collateral_sats, owed, worth, ltv)
