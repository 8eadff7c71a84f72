"""Request and response bodies. Integers are strict: a float or a string where sats
or kopecks are expected is refused, never coerced."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
)

MAX_SATS = 21_000_000 * 100_000_000
MAX_KOPECKS = 10**17

Sats = Annotated[StrictInt, Field(gt=0, le=MAX_SATS)]


def _no_float(value: object) -> object:
    """Prices arrive as strings (or integers): a JSON float has already lost digits."""
    if isinstance(value, float):
        raise ValueError("send the price as a decimal string, not a JSON number with a fraction")
    return value


Price = Annotated[Decimal, BeforeValidator(_no_float), Field(gt=0, max_digits=30, decimal_places=8)]
Bps = Annotated[StrictInt, Field(gt=0, le=10_000)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoanTermsIn(Strict):
    principal_kopecks: Annotated[StrictInt, Field(gt=0, le=MAX_KOPECKS)]
    interest_rate_bps: Annotated[StrictInt, Field(ge=0, le=100_000)]
    maturity_at: AwareDatetime
    required_collateral_sats: Sats | None = None
    target_ltv_bps: Bps | None = None
    price_rub_per_btc: Price | None = None
    price_source: Annotated[StrictStr, Field(min_length=1, max_length=120)] | None = None
    margin_call_ltv_bps: Bps = 7_500
    liquidation_ltv_bps: Bps = 9_000
    cure_window_hours: Annotated[StrictInt, Field(gt=0, le=24 * 90)] = 48
    required_confirmations: Annotated[StrictInt, Field(ge=1, le=100)] | None = None
    miner_return_address: Annotated[StrictStr, Field(min_length=1, max_length=100)]
    bank_liquidation_address: Annotated[StrictStr, Field(min_length=1, max_length=100)]


class LoanCreate(Strict):
    miner_party_id: StrictInt
    arbiter_party_id: StrictInt
    terms: LoanTermsIn


class HDKeyIn(Strict):
    kind: Literal["hd"]
    key: Annotated[StrictStr, Field(min_length=1, max_length=300)]


class HSMPublicKeyIn(Strict):
    """An HSM key generated elsewhere, registered by its compressed public key."""

    kind: Literal["hsm"]
    public_key: Annotated[StrictStr, Field(min_length=1, max_length=200)]


KeyIn = Annotated[HDKeyIn | HSMPublicKeyIn, Field(discriminator="kind")]


class KeyOut(BaseModel):
    role: str
    kind: str
    party_id: int
    descriptor_key: str
    fingerprint: str | None
    origin_path: str | None
    xpub: str | None
    public_key: str | None
    hsm_key_label: str | None
    hsm_local: bool | None
    hsm_never_extractable: bool | None


class AddressOut(BaseModel):
    index: int
    change: bool
    address: str


class TermsOut(BaseModel):
    principal_kopecks: int
    interest_rate_bps: int
    maturity_at: datetime
    required_collateral_sats: int
    target_ltv_bps: int | None
    price_rub_per_btc: str | None
    price_source: str | None
    margin_call_ltv_bps: int
    liquidation_ltv_bps: int
    cure_window_hours: int
    required_confirmations: int | None
    miner_return_address: str
    bank_liquidation_address: str


class CollateralOut(BaseModel):
    confirmed_sats: int
    pending_sats: int
    excess_sats: int
    required_sats: int


class DepositOut(BaseModel):
    txid: str
    vout: int
    amount_sats: int
    state: str
    confirmations: int
    required_confirmations: int
    block_height: int | None
    excess_sats: int
    spent_txid: str | None


class LoanOut(BaseModel):
    id: int
    state: str
    miner_party_id: int
    bank_party_id: int
    arbiter_party_id: int
    terms: TermsOut
    keys: list[KeyOut]
    descriptor: str | None
    collateral_address: str | None
    collateral: CollateralOut
    created_at: datetime


class PartyCreate(Strict):
    name: Annotated[StrictStr, Field(min_length=1, max_length=120)]
    kind: Literal["miner", "bank", "arbiter"]


class PartyOut(BaseModel):
    id: int
    name: str
    kind: str


class PrincipalCreate(Strict):
    name: Annotated[StrictStr, Field(min_length=1, max_length=120)]
    role: Literal["miner", "bank_operator", "bank_approver", "arbiter", "auditor", "admin"]
    party_id: StrictInt | None = None


class PrincipalOut(BaseModel):
    id: int
    name: str
    role: str
    party_id: int | None
    key_prefix: str


class PrincipalCreated(PrincipalOut):
    api_key: str = Field(description="Shown once; only its hash is stored.")


class SigningRequestCreate(Strict):
    action: Literal["release", "dispute_release", "liquidation", "partial_liquidation"]
    fee_rate_sat_vb: Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=3)] | None = None
    price_rub_per_btc: Price | None = None
    price_source: Annotated[StrictStr, Field(min_length=1, max_length=120)] | None = None
    target_ltv_bps: Bps | None = None


class SignatureUpload(Strict):
    psbt: Annotated[StrictStr, Field(min_length=1, max_length=2_000_000)]


class FeeBump(Strict):
    fee_rate_sat_vb: Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=3)]


class SigningRequestOut(BaseModel):
    id: int
    loan_id: int
    action: str
    state: str
    unsigned_txid: str
    required_seats: list[str]
    signed_seats: list[str]
    outputs: list[dict[str, object]]
    fee_sats: int
    evidence: dict[str, object]
    replaces_id: int | None
    mined_height: int | None
    reject_reason: str | None
    created_at: datetime
    signer_statement_id: int | None = None  # what the bank's people sign (HSM-held key)


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


class PsbtOut(BaseModel):
    psbt: str
    unsigned_txid: str


class PriceSet(Strict):
    price_rub_per_btc: Price
    quoted_at: AwareDatetime | None = None


class PriceOut(BaseModel):
    price_rub_per_btc: str
    source: str
    quoted_at: datetime
    set_by: str


class WebhookCreate(Strict):
    url: Annotated[StrictStr, Field(min_length=1, max_length=500)]
    secret: Annotated[StrictStr, Field(min_length=32, max_length=256)]
    events: list[StrictStr] | Literal["*"] = "*"
