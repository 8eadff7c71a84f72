"""The LTV ladder: where a loan should be, given its debt, its collateral and a price.

Pure and total, so every boundary is testable: a threshold is reached AT its value
(LTV == margin call -> margin call), LTV rounds up (the cautious side).

    active       --LTV >= call-->                         margin_call
    margin_call  --LTV < call (a top-up or a rise)-->      active      (cured)
    margin_call  --cure window over, LTV still >= call-->  liquidate
    any open     --LTV >= liquidation-->                   liquidate
    any open     --maturity passed, not repaid-->          liquidate   (default)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from pledge.amounts import ltv_bps


class Move(StrEnum):
    stay = "stay"
    margin_call = "margin_call"
    cure = "cure"
    liquidate = "liquidate"


@dataclass(frozen=True)
class LoanPosition:
    state: str  # "active" or "margin_call": the states the ladder moves
    debt_kopecks: int
    collateral_sats: int
    margin_call_ltv_bps: int
    liquidation_ltv_bps: int
    cure_window: timedelta
    maturity_at: datetime
    margin_call_since: datetime | None


@dataclass(frozen=True)
class Decision:
    move: Move
    ltv_bps: int | None
    reason: str


def evaluate(pos: LoanPosition, price_rub_per_btc: Decimal, now: datetime) -> Decision:
    if pos.state not in ("active", "margin_call"):
        return Decision(Move.stay, None, f"the ladder does not move a loan that is {pos.state}")
    if now >= pos.maturity_at:
        return Decision(
            Move.liquidate,
            _ltv_or_none(pos, price_rub_per_btc),
            f"default: matured {pos.maturity_at.isoformat()} without repayment",
        )
    if pos.collateral_sats <= 0:
        return Decision(Move.liquidate, None, "no confirmed collateral left")
    ltv = ltv_bps(pos.debt_kopecks, pos.collateral_sats, price_rub_per_btc)
    if ltv >= pos.liquidation_ltv_bps:
        return Decision(
            Move.liquidate,
            ltv,
            f"LTV {ltv} bps at or above liquidation {pos.liquidation_ltv_bps} bps",
        )
    if pos.state == "active":
        if ltv >= pos.margin_call_ltv_bps:
            return Decision(
                Move.margin_call,
                ltv,
                f"LTV {ltv} bps at or above margin call {pos.margin_call_ltv_bps} bps",
            )
        return Decision(Move.stay, ltv, "below the margin-call threshold")
    if ltv < pos.margin_call_ltv_bps:
        return Decision(
            Move.cure, ltv, f"LTV {ltv} bps back below margin call {pos.margin_call_ltv_bps} bps"
        )
    since = pos.margin_call_since or now
    if now >= since + pos.cure_window:
        return Decision(
            Move.liquidate, ltv, f"cure window of {pos.cure_window} over with LTV still {ltv} bps"
        )
    left = since + pos.cure_window - now
    return Decision(Move.stay, ltv, f"margin call: {left} left to cure")


def _ltv_or_none(pos: LoanPosition, price: Decimal) -> int | None:
    return ltv_bps(pos.debt_kopecks, pos.collateral_sats, price) if pos.collateral_sats else None
