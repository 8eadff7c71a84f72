"""The replay of the audit log that every report stands on: which outpoints were a loan's
collateral after a sequence of the watcher's events, what had been paid off, the state."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from custody.reports import history


@dataclass(frozen=True)
class Event:
    action: str
    loan_id: int | None
    data: str
    request_id: int | None = None


def dep(
    action: str, txid: str, amount: int = 1_000, height: int | None = 10, **extra: Any
) -> Event:
    data = {"txid": txid, "vout": 0, "amount_sats": amount, "block_height": height, **extra}
    return Event(action, 1, json.dumps(data))


def held(events: list[Event]) -> list[str]:
    return sorted(h.txid for h in history.holdings(events).by_loan.get(1, []))


def test_an_outpoint_counts_from_its_confirmation_until_its_spend() -> None:
    seen = [dep("deposit.mined", "a")]
    confirmed = [*seen, dep("deposit.confirmed", "a", confirmations=3)]
    assert held(seen) == [] and held(confirmed) == ["a"]
    assert history.holdings(confirmed).known_height == 12  # mined at 10, 3 confirmations
    spent = [*confirmed, dep("deposit.spent", "a", spent_by="b")]
    assert held(spent) == []
    assert held([*spent, dep("deposit.unspent", "a")]) == ["a"]  # the spend was orphaned


def test_a_reorg_or_a_lost_confirmation_takes_it_out() -> None:
    confirmed = [dep("deposit.mined", "a"), dep("deposit.confirmed", "a", confirmations=1)]
    assert held([*confirmed, dep("deposit.reorged", "a")]) == []
    assert held([*confirmed, dep("deposit.unconfirmed", "a")]) == []
    again = [*confirmed, dep("deposit.reorged", "a"), dep("deposit.mined", "a", height=11)]
    again.append(dep("deposit.confirmed", "a", height=11, confirmations=1))
    [h] = history.holdings(again).by_loan[1]
    assert h.block_height == 11
    # An unspent deposit that never confirmed again stays out.
    assert held([*confirmed, dep("deposit.unconfirmed", "a"), dep("deposit.unspent", "a")]) == []


def test_states_and_credits_replay() -> None:
    events = [
        Event("loan.created", 1, json.dumps({"state": "draft"})),
        Event("loan.state_changed", 1, json.dumps({"from": "draft", "to": "awaiting_deposit"})),
        Event("loan.state_changed", 1, json.dumps({"from": "awaiting_deposit", "to": "active"})),
        Event("loan.repayment_recorded", 1, json.dumps({"amount_kopecks": 500, "credited": True})),
        Event("loan.repayment_recorded", 1, json.dumps({"amount_kopecks": 70, "credited": False})),
        Event("signing_request.confirmed", 1, "{}", request_id=7),
        Event("signing_request.unconfirmed", 1, "{}", request_id=7),
        Event("signing_request.confirmed", 1, "{}", request_id=7),
    ]
    assert history.states(events) == {1: "active"}
    assert history.credits(events, {7: 1_000}) == {1: 1_500}


def test_the_price_that_took_effect_last_wins() -> None:
    t = datetime(2026, 12, 1, tzinfo=UTC)
    manual = history.manual_price(3, "8000000", t)
    engine = history.PriceAt(Decimal("7900000"), "median", t + timedelta(minutes=1))
    assert history.latest(manual, engine) == engine
    assert history.latest(None, manual) == manual and history.latest() is None
