"""4-eyes and velocity rules of the bank signer (pure, no HSM needed)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from embit.psbt import PSBT
from embit.script import Script
from embit.transaction import Transaction, TransactionInput, TransactionOutput

from hsm.boundary import (
    Approval,
    Authorization,
    check_authorization,
    check_velocity,
    unsigned_txid_of,
)
from hsm.policy import PolicyViolation


def _psbt(locktime: int = 0) -> str:
    tx = Transaction(
        vin=[TransactionInput(os.urandom(32), 0, sequence=0xFFFFFFFD)],
        vout=[TransactionOutput(1_000, Script(b"\x00\x14" + os.urandom(20)))],
        locktime=locktime,
    )
    return str(PSBT(tx).to_string())


OP, AP, AP2 = "bank_operator:olga", "bank_approver:anna", "bank_approver:boris"


def test_requester_plus_a_different_approver_of_this_transaction_passes() -> None:
    psbt = _psbt()
    auth = Authorization(
        OP, "bank_operator", (Approval(AP, "bank_approver", unsigned_txid_of(psbt)),)
    )
    assert "approved by bank_approver:anna" in check_authorization(psbt, auth)


@pytest.mark.parametrize(
    ("approvals", "why"),
    [
        ((), "no bank approver"),
        ((Approval(OP, "bank_approver", "TXID"),), "cannot approve their own"),
        ((Approval("miner:m", "miner", "TXID"),), "no bank approver"),
        ((Approval("bank_operator:other", "bank_operator", "TXID"),), "no bank approver"),
    ],
)
def test_missing_or_self_approval_is_refused(approvals: tuple[Approval, ...], why: str) -> None:
    psbt = _psbt()
    txid = unsigned_txid_of(psbt)
    fixed = tuple(Approval(a.principal, a.role, txid) for a in approvals)
    with pytest.raises(PolicyViolation, match=why) as err:
        check_authorization(psbt, Authorization(OP, "bank_operator", fixed))
    assert err.value.check == "approvals"


def test_an_approval_of_an_older_psbt_does_not_carry_over() -> None:
    old, new = _psbt(locktime=0), _psbt(locktime=1)
    auth = Authorization(
        OP, "bank_operator", (Approval(AP, "bank_approver", unsigned_txid_of(old)),)
    )
    with pytest.raises(PolicyViolation, match="needs a new approval"):
        check_authorization(new, auth)


def test_only_bank_operators_request_and_the_risk_engine_needs_evidence() -> None:
    psbt = _psbt()
    with pytest.raises(PolicyViolation, match="cannot request"):
        check_authorization(psbt, Authorization("miner:m", "miner"))
    with pytest.raises(PolicyViolation, match="price_source"):
        check_authorization(
            psbt,
            Authorization(
                "risk",
                "risk_engine",
                risk_evidence={"price_rub_per_btc": "5000000", "ltv_bps": 9100, "quoted_at": "now"},
            ),
        )
    ok = check_authorization(
        psbt,
        Authorization(
            "risk",
            "risk_engine",
            risk_evidence={
                "price_rub_per_btc": "5000000",
                "price_source": "median",
                "ltv_bps": 9100,
                "quoted_at": "2026-11-21T00:00:00Z",
            },
        ),
    )
    assert "9100" in ok


class _Ledger:
    def __init__(self) -> None:
        self.rows: list[tuple[str, int, datetime]] = []

    def signed_since(self, since: datetime) -> int:
        return sum(s for _, s, at in self.rows if at >= since)

    def add(self, unsigned_txid: str, sats: int, at: datetime) -> None:
        self.rows.append((unsigned_txid, sats, at))


def test_velocity_counts_the_last_24_hours_only() -> None:
    now = datetime.now(UTC)
    ledger = _Ledger()
    ledger.add("old", 90, now - timedelta(hours=25))
    ledger.add("recent", 60, now - timedelta(hours=1))
    check_velocity(ledger, 40, 100, now)  # 60 + 40 = 100: at the limit is allowed
    with pytest.raises(PolicyViolation, match="daily limit") as err:
        check_velocity(ledger, 41, 100, now)
    assert err.value.check == "velocity"
