"""Bodies for the bank's signer: people to enrol, their endorsements (a raw signature or a
passkey's WebAuthn assertion), repayments, and what an approval page needs to ask a passkey."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    Field,
    StrictInt,
    model_validator,
)

from custody.schemas import Strict, Text

# Identifiers of the bank's signer, sent exactly (not trimmed).
_PERSON = Text(64, trim=False, pattern=r"^[a-z0-9._@-]+$")


_B64URL = r"^[A-Za-z0-9_-]+$"


class WebAuthnAssertionIn(Strict):
    """What `navigator.credentials.get()` returned, base64url without padding (as
    `PublicKeyCredential.toJSON()` gives it): the signer parses and checks it."""

    credential_id: Annotated[str, Text(1366, trim=False, pattern=_B64URL)]
    authenticator_data: Annotated[str, Text(1400, trim=False, pattern=_B64URL)]
    client_data_json: Annotated[str, Text(4000, trim=False, pattern=_B64URL)]
    signature: Annotated[str, Text(200, trim=False, pattern=_B64URL)]


class EndorsementIn(Strict):
    """One enrolled person's approval of a signer statement: a raw `signature` (base64)
    or, for a person enrolled with a passkey, its `webauthn` assertion whose challenge is
    the statement's digest. Exactly one of the two."""

    person: Annotated[str, _PERSON]
    signature: Annotated[str, Text(400, trim=False, pattern=r"^[A-Za-z0-9+/=]+$")] | None = None
    webauthn: WebAuthnAssertionIn | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if (self.signature is None) == (self.webauthn is None):
            raise ValueError("send a signature or a webauthn assertion (one of them)")
        return self


class EnrolmentIn(Strict):
    """A person to enrol in the bank's signer, with the public half of their approval key:
    hex of a raw Ed25519 or P-256 key, or (`webauthn`) a passkey's COSE public key
    (base64url) with its `credential_id`, the `rp_id` and the `origins` it may sign from."""

    name: Annotated[str, _PERSON]
    role: Literal["admin", "bank_operator", "bank_approver"]
    algorithm: Literal["ed25519", "p256", "webauthn"] = "ed25519"
    public_key: Annotated[str, Text(1400, min_length=32, trim=False, pattern=_B64URL)]
    credential_id: Annotated[str, Text(1366, trim=False, pattern=_B64URL)] | None = None
    rp_id: Annotated[str, Text(253, trim=False, pattern=r"^[a-z0-9.-]+$")] | None = None
    origins: (
        Annotated[
            list[Annotated[str, Text(300, trim=False, pattern=r"^https?://[a-z0-9.:-]+$")]],
            Field(min_length=1, max_length=8),
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _key_of_its_kind(self) -> Self:
        passkey = (self.credential_id, self.rp_id, self.origins)
        if self.algorithm == "webauthn":
            if any(p is None for p in passkey):
                raise ValueError("a passkey needs its credential_id, rp_id and origins")
        else:
            if any(p is not None for p in passkey):
                raise ValueError("credential_id, rp_id and origins are for a passkey only")
            if len(self.public_key) < 64 or not all(
                c in "0123456789abcdefABCDEF" for c in self.public_key
            ):
                raise ValueError("an ed25519 or p256 public key is hex (64 digits or more)")
        return self


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


class PasskeyCredentialOut(BaseModel):
    """A passkey that may approve the statement, as far as the service's records show."""

    person: str
    role: str
    credential_id: str
    rp_id: str


class ApprovalChallengeOut(BaseModel):
    """What an approval page asks the approver's passkey to sign: the statement the bank's
    signer issued, its canonical bytes and the WebAuthn challenge (base64url of its SHA-256
    digest, exactly what the signer expects), and the passkeys that may sign it
    (`allowCredentials`). The endorsement goes to `endorse_at`."""

    request_id: int
    statement_id: int
    state: str
    statement: dict[str, object]
    canonical: str
    digest: str
    challenge: str
    signed_by: list[str]
    credentials: list[PasskeyCredentialOut]
    endorse_at: str
