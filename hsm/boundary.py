"""What the bank's signer requires besides a well-formed PSBT: the people (or the risk
engine) who authorised it, and a daily ceiling on what it signs.

Both checks run inside the signer, in-process or in `hsm serve`, before any signature:
- 4-eyes: a release or a manual liquidation needs the requester and a *different*
  bank approver; an automatic liquidation needs the risk engine's evidence instead.
  Every approval names the unsigned txid it approved: a changed PSBT is a different
  transaction and needs new approvals.
- velocity: at most `daily_limit_sats` of collateral moved per signer per 24 hours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from embit.psbt import PSBT

from hsm.policy import PolicyViolation

BANK_REQUESTERS = frozenset({"bank_operator"})
BANK_APPROVERS = frozenset({"bank_approver"})


@dataclass(frozen=True)
class Approval:
    principal: str  # a stable identity: "role:name"
    role: str
    unsigned_txid: str


@dataclass(frozen=True)
class Authorization:
    """Who asked for this PSBT and who approved it (or the risk engine's evidence)."""

    requested_by: str
    requester_role: str
    approvals: tuple[Approval, ...] = ()
    risk_evidence: dict[str, Any] | None = field(default=None)


def unsigned_txid_of(psbt_b64: str) -> str:
    txid: str = PSBT.from_string(psbt_b64).tx.txid().hex()
    return txid


def check_authorization(psbt_b64: str, auth: Authorization) -> str:
    """Return a one-line account of who authorised this transaction, or refuse."""
    txid = unsigned_txid_of(psbt_b64)
    if auth.requester_role == "risk_engine":
        ev = auth.risk_evidence or {}
        missing = [
            k
            for k in ("price_rub_per_btc", "price_source", "ltv_bps", "quoted_at")
            if not ev.get(k)
        ]
        if missing:
            raise PolicyViolation(
                "risk_evidence",
                f"an automatic liquidation needs the risk engine's evidence "
                f"({', '.join(missing)} missing)",
            )
        return f"risk engine: LTV {ev['ltv_bps']} bps at {ev['price_rub_per_btc']} RUB/BTC"
    if auth.requester_role not in BANK_REQUESTERS:
        raise PolicyViolation(
            "approvals", f"a {auth.requester_role} cannot request a bank signature"
        )
    valid = [
        a for a in auth.approvals if a.role in BANK_APPROVERS and a.principal != auth.requested_by
    ]
    if any(a.principal == auth.requested_by for a in auth.approvals):
        raise PolicyViolation(
            "approvals", "the requester cannot approve their own request (4-eyes)"
        )
    current = [a for a in valid if a.unsigned_txid == txid]
    if not current:
        stale = [a for a in valid if a.unsigned_txid != txid]
        if stale:
            raise PolicyViolation(
                "approvals",
                f"the approval is for transaction {stale[0].unsigned_txid}, this PSBT is {txid}: "
                "a changed PSBT needs a new approval",
            )
        raise PolicyViolation("approvals", "no bank approver has approved this transaction")
    return f"requested by {auth.requested_by}, approved by {current[0].principal}"


class UsageLedger(Protocol):
    """What the signer has signed recently; one per signer."""

    def signed_since(self, since: datetime) -> int: ...
    def add(self, unsigned_txid: str, sats: int, at: datetime) -> None: ...


def check_velocity(
    ledger: UsageLedger, amount_sats: int, daily_limit_sats: int, now: datetime
) -> None:
    used = ledger.signed_since(now - timedelta(hours=24))
    if used + amount_sats > daily_limit_sats:
        raise PolicyViolation(
            "velocity",
            f"signing {amount_sats} sats would bring the last 24 hours to {used + amount_sats}, "
            f"above the daily limit of {daily_limit_sats}",
        )


def input_total(psbt_b64: str) -> int:
    psbt = PSBT.from_string(psbt_b64)
    total = 0
    for inp in psbt.inputs:
        if inp.witness_utxo is None:
            raise PolicyViolation("inputs", "an input carries no witness_utxo amount")
        total += int(inp.witness_utxo.value)
    return total


def approvals_from(rows: Sequence[tuple[str, str, str]]) -> tuple[Approval, ...]:
    return tuple(Approval(principal=p, role=r, unsigned_txid=t) for p, r, t in rows)
