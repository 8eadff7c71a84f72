"""LTV ladder transitions at exact boundaries, cure, window expiry, default; interest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from custody.db.models import Loan, LoanState
from custody.loans.debt import accrued_interest_kopecks, outstanding_debt_kopecks
from custody.risk.ladder import LoanPosition, Move, evaluate

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
COLLATERAL = 100_000_000  # 1 BTC
PRICE = Decimal(10_000_000)  # RUB/BTC: 1 BTC is worth 10,000,000.00 RUB


def pos(ltv_bps: int, state: str = "active", **kw: object) -> LoanPosition:
    """A loan whose LTV at PRICE is exactly `ltv_bps` (debt chosen to hit it)."""
    debt = 10_000_000_00 * ltv_bps // 10_000  # kopecks
    base: dict[str, object] = dict(
        state=state,
        debt_kopecks=debt,
        collateral_sats=COLLATERAL,
        margin_call_ltv_bps=7_500,
        liquidation_ltv_bps=9_000,
        cure_window=timedelta(hours=48),
        maturity_at=NOW + timedelta(days=30),
        margin_call_since=None,
    )
    base.update(kw)
    return LoanPosition(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ltv", "move"),
    [
        (7_499, Move.stay),
        (7_500, Move.margin_call),
        (7_501, Move.margin_call),
        (8_999, Move.margin_call),
        (9_000, Move.liquidate),
        (9_001, Move.liquidate),
    ],
)
def test_active_loan_boundaries(ltv: int, move: Move) -> None:
    decision = evaluate(pos(ltv), PRICE, NOW)
    assert (decision.move, decision.ltv_bps) == (move, ltv)


@pytest.mark.parametrize(
    ("ltv", "move"),
    [(7_499, Move.cure), (7_500, Move.stay), (8_999, Move.stay), (9_000, Move.liquidate)],
)
def test_margin_call_boundaries_inside_the_window(ltv: int, move: Move) -> None:
    p = pos(ltv, state="margin_call", margin_call_since=NOW - timedelta(hours=47, minutes=59))
    assert evaluate(p, PRICE, NOW).move == move


def test_the_cure_window_ends_exactly_at_its_length() -> None:
    since = NOW - timedelta(hours=48)
    assert (
        evaluate(pos(8_000, "margin_call", margin_call_since=since), PRICE, NOW).move
        == Move.liquidate
    )
    just_inside = since + timedelta(seconds=1)
    assert (
        evaluate(pos(8_000, "margin_call", margin_call_since=just_inside), PRICE, NOW).move
        == Move.stay
    )


def test_a_price_rise_or_top_up_cures() -> None:
    p = pos(8_000, "margin_call", margin_call_since=NOW)
    assert evaluate(p, PRICE * 2, NOW).move == Move.cure  # LTV halves
    topped_up = pos(8_000, "margin_call", margin_call_since=NOW, collateral_sats=COLLATERAL * 2)
    assert evaluate(topped_up, PRICE, NOW).move == Move.cure


def test_default_at_maturity_liquidates_whatever_the_ltv() -> None:
    assert evaluate(pos(1_000, maturity_at=NOW), PRICE, NOW).move == Move.liquidate
    assert "default" in evaluate(pos(1_000, maturity_at=NOW), PRICE, NOW).reason
    assert (
        evaluate(pos(1_000, maturity_at=NOW + timedelta(seconds=1)), PRICE, NOW).move == Move.stay
    )


def test_other_states_are_left_alone() -> None:
    for state in ("awaiting_deposit", "releasing", "liquidating", "released"):
        assert evaluate(pos(9_500, state), PRICE, NOW).move == Move.stay


def _loan(**kw: object) -> Loan:
    base: dict[str, object] = dict(
        state=LoanState.active,
        miner_party_id=1,
        bank_party_id=2,
        arbiter_party_id=3,
        principal_kopecks=1_000_000_00,
        interest_rate_bps=1_825,
        maturity_at=NOW,
        required_collateral_sats=1,
        margin_call_ltv_bps=7_500,
        liquidation_ltv_bps=9_000,
        cure_window_hours=48,
        miner_return_address="a",
        bank_liquidation_address="b",
        created_by=1,
        created_at=NOW,
    )
    base.update(kw)
    return Loan(**base)  # type: ignore[arg-type]


def test_interest_accrues_simply_and_rounds_up_to_the_kopeck() -> None:
    loan = _loan()  # 1,000,000.00 RUB at 18.25% a year
    assert accrued_interest_kopecks(loan, NOW) == 0
    # One day: 1,000,000.00 * 0.1825 / 365 = 500.00 RUB exactly.
    assert accrued_interest_kopecks(loan, NOW + timedelta(days=1)) == 500_00
    # One second: 0.00578.. kopecks -> rounds up to 1.
    assert accrued_interest_kopecks(loan, NOW + timedelta(seconds=1)) == 1
    assert outstanding_debt_kopecks(loan, NOW + timedelta(days=365)) == 1_182_500_00
    credited = _loan(credited_kopecks=200_000_00)
    assert outstanding_debt_kopecks(credited, NOW) == 800_000_00
