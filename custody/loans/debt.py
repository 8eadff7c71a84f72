"""What the miner owes on a loan row: the kernel's rule (`pledge.debt`, which the bank's
signer applies too) fed from the service's records."""

from __future__ import annotations

from datetime import UTC, datetime

from custody.db.models import Loan
from pledge import debt


def accrued_interest_kopecks(loan: Loan, at: datetime) -> int:
    return debt.accrued_interest_kopecks(
        loan.principal_kopecks, loan.interest_rate_bps, loan.created_at, at
    )


def outstanding_debt_kopecks(loan: Loan, at: datetime | None = None) -> int:
    return debt.outstanding_debt_kopecks(
        loan.principal_kopecks,
        loan.interest_rate_bps,
        loan.created_at,
        at or datetime.now(UTC),
        loan.credited_kopecks,
    )
