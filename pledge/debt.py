"""What a miner owes, as a pure rule both the service and the bank's signer apply.

Principal plus simple interest accrued since the start, less what was paid (repayments,
partial liquidations). Integer kopecks; interest rounds up (the bank's conservative side,
never more than one kopeck)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

SECONDS_PER_YEAR: Final = 365 * 24 * 3600


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def accrued_interest_kopecks(
    principal_kopecks: int, interest_rate_bps: int, start: datetime, at: datetime
) -> int:
    seconds = max(0, int((_aware(at) - _aware(start)).total_seconds()))
    numerator = principal_kopecks * interest_rate_bps * seconds
    return -(-numerator // (10_000 * SECONDS_PER_YEAR))  # ceiling division


def outstanding_debt_kopecks(
    principal_kopecks: int,
    interest_rate_bps: int,
    start: datetime,
    at: datetime,
    paid_kopecks: int = 0,
) -> int:
    accrued = accrued_interest_kopecks(principal_kopecks, interest_rate_bps, start, at)
    return max(0, principal_kopecks + accrued - paid_kopecks)
