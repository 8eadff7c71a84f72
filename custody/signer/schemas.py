"""Bodies for the bank's signer: people to enrol, their endorsements, repayments."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    Field,
    StrictInt,
)

from custody.schemas import Strict


class EndorsementIn(Strict):
    """One enrolled person's signature over a signer statement (base64)."""

    person: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9._@-]+$")
    signature: str = Field(min_length=1, max_length=400, pattern=r"^[A-Za-z0-9+/=]+$")


class EnrolmentIn(Strict):
    """A person to enrol in the bank's signer, with the public half of their approval key."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9._@-]+$")
    role: Literal["admin", "bank_operator", "bank_approver"]
    algorithm: Literal["ed25519", "p256"] = "ed25519"
    public_key: str = Field(min_length=64, max_length=200, pattern=r"^[0-9a-fA-F]+$")


class RepaymentIn(Strict):
    amount_kopecks: Annotated[StrictInt, Field(gt=0, le=10**15)]
    paid_at: AwareDatetime
    repayment_id: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$"
    )
