"""Bodies for the bank's signer: people to enrol, their endorsements, repayments."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    Field,
    StrictInt,
)

from custody.schemas import Strict, Text

# Identifiers of the bank's signer, sent exactly (not trimmed).
_PERSON = Text(64, trim=False, pattern=r"^[a-z0-9._@-]+$")


class EndorsementIn(Strict):
    """One enrolled person's signature over a signer statement (base64)."""

    person: Annotated[str, _PERSON]
    signature: Annotated[str, Text(400, trim=False, pattern=r"^[A-Za-z0-9+/=]+$")]


class EnrolmentIn(Strict):
    """A person to enrol in the bank's signer, with the public half of their approval key."""

    name: Annotated[str, _PERSON]
    role: Literal["admin", "bank_operator", "bank_approver"]
    algorithm: Literal["ed25519", "p256"] = "ed25519"
    public_key: Annotated[str, Text(200, min_length=64, trim=False, pattern=r"^[0-9a-fA-F]+$")]


class BankKeyIn(Strict):
    """Which bank key the signer makes for a loan.

    `hd` (the default): the loan's own BIP-48 account of the bank seed the HSM seals; the
    descriptor is all-xpub, so every hardware wallet and coordinator can register the
    wallet and show its addresses. `fixed`: a secp256k1 key generated in the token that
    never leaves it; only Trezor (via HWI), Bitcoin Core and BDK can use such a loan."""

    kind: Literal["hd", "fixed"] = "hd"


class RepaymentIn(Strict):
    amount_kopecks: Annotated[StrictInt, Field(gt=0, le=10**15)]
    paid_at: AwareDatetime
    repayment_id: Annotated[str, Text(64, trim=False, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
