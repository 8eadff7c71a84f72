"""What the miner owes: principal plus simple interest accrued, less what partial
liquidations already paid off. Integer kopecks; interest rounds up (the bank's
conservative side, never more than one kopeck)."""

from __future__ import annotations

from datetime import UTC, datetime

from custody.db.models import Loan

SECONDS_PER_YEAR = 365 * 24 * 3600


def accrued_interest_kopecks(loan: Loan, at: datetime) -> int:
    start = loan.created_at if loan.created_at.tzinfo else loan.created_at.replace(tzinfo=UTC)
    seconds = max(0, int((at - start).total_seconds()))
    numerator = loan.principal_kopecks * loan.interest_rate_bps * seconds
    return -(-numerator // (10_000 * SECONDS_PER_YEAR))  # ceiling division


def outstanding_debt_kopecks(loan: Loan, at: datetime | None = None) -> int:
    at = at or datetime.now(UTC)
    return max(
        0, loan.principal_kopecks + accrued_interest_kopecks(loan, at) - loan.credited_kopecks
    )
