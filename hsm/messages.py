"""What callers send the signer and what it answers: one vocabulary for both transports.

The in-process transport serialises these to JSON bytes and hands them to the very same
`SignerCore.handle` that `hsm serve` calls, so the two cannot parse, bound or refuse a
request differently. `extra="forbid"` everywhere: a field the signer does not know is an
attempt to claim something, and is refused rather than ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

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
    "WebAuthnBody",
]


LoanRef = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
]
Nonce = Annotated[str, StringConstraints(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Psbt = Annotated[str, StringConstraints(min_length=1, max_length=900_000)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _b64url(max_length: int) -> Any:
    return StringConstraints(min_length=1, max_length=max_length, pattern=r"^[A-Za-z0-9_-]+$")


class WebAuthnBody(_Body):
    """A passkey's assertion as the browser returned it (base64url, no padding); the
    signer parses and checks it (`hsm.passkeys`)."""

    credential_id: Annotated[str, _b64url(1366)]
    authenticator_data: Annotated[str, _b64url(1400)]
    client_data_json: Annotated[str, _b64url(4000)]
    signature: Annotated[str, _b64url(200)]


class EndorsementBody(_Body):
    """One person's approval: a raw `signature` (base64) or a passkey's `webauthn`
    assertion, never both."""

    person: str = Field(min_length=1, max_length=64)
    signature: str | None = Field(default=None, min_length=1, max_length=400)
    webauthn: WebAuthnBody | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> EndorsementBody:
        if (self.signature is None) == (self.webauthn is None):
            raise ValueError("an endorsement carries a signature or a webauthn assertion")
        return self


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


class ProofBody(_Body):
    """Sign a proof-of-reserves PSBT (BIP-127) over the loan's coins for the auditor's
    `challenge`: it can never move coins, so no approvals; the policy sees to that."""

    loan_ref: LoanRef
    psbt: Psbt
    challenge: Annotated[str, StringConstraints(min_length=1, max_length=500)]
