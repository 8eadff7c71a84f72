"""What callers send the signer and what it answers: one vocabulary for both transports.

The in-process transport serialises these to JSON bytes and hands them to the very same
`SignerCore.handle` that `hsm serve` calls, so the two cannot parse, bound or refuse a
request differently. `extra="forbid"` everywhere: a field the signer does not know is an
attempt to claim something, and is refused rather than ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from pledge.actions import BANK_ACTIONS, BankAction

__all__ = [
    "BANK_ACTIONS",
    "BankAction",
    "CancelBody",
    "EndorsementBody",
    "LoanRefBody",
    "PrepareBody",
    "SignBody",
    "StatementBody",
]


LoanRef = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
]
Nonce = Annotated[str, StringConstraints(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Psbt = Annotated[str, StringConstraints(min_length=1, max_length=900_000)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class EndorsementBody(_Body):
    person: str = Field(min_length=1, max_length=64)
    signature: str = Field(min_length=1, max_length=400)


class StatementBody(_Body):
    """A statement and the signatures over its canonical form (pledge.statements)."""

    statement: dict[str, Any]
    approvals: list[EndorsementBody] = Field(default_factory=list, max_length=8)


class LoanRefBody(_Body):
    loan_ref: LoanRef


class PrepareBody(_Body):
    """Ask for the statement two bank people must sign before the signer signs a PSBT."""

    loan_ref: LoanRef
    action: BankAction
    psbt: Psbt
    valuation_id: Nonce | None = None


class CancelBody(_Body):
    nonce: Nonce


class SignBody(_Body):
    """Sign `psbt` for `action`: either on the approvals of the statement `nonce`
    (`automatic` false), or, for a liquidation only, on the signer's own valuation
    (`automatic` true). Amounts, addresses, debt and price never come from here."""

    loan_ref: LoanRef
    action: BankAction
    psbt: Psbt
    automatic: bool = False
    nonce: Nonce | None = None
    approvals: list[EndorsementBody] = Field(default_factory=list, max_length=8)
    valuation_id: Nonce | None = None
