"""Loan request and response bodies: terms, keys, addresses, collateral, deposits."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    Field,
    StrictInt,
)

from custody.schemas import MAX_KOPECKS, Bps, Id, Name, Price, Sats, Strict, Text

Address = Annotated[str, Text(100)]

# The wallet files `GET /v1/loans/{id}/export/{fmt}` writes (custody/bitcoin/exports.py).
ExportFormat = Literal["descriptor", "coldcard", "bsms", "caravan", "wallet-policy", "sparrow"]


class LoanTermsIn(Strict):
    principal_kopecks: Annotated[StrictInt, Field(gt=0, le=MAX_KOPECKS)]
    interest_rate_bps: Annotated[StrictInt, Field(ge=0, le=100_000)]
    maturity_at: AwareDatetime
    required_collateral_sats: Sats | None = None
    target_ltv_bps: Bps | None = None
    price_rub_per_btc: Price | None = None
    price_source: Name | None = None
    margin_call_ltv_bps: Bps = 7_500
    liquidation_ltv_bps: Bps = 9_000
    cure_window_hours: Annotated[StrictInt, Field(gt=0, le=24 * 90)] = 48
    required_confirmations: Annotated[StrictInt, Field(ge=1, le=100)] | None = None
    miner_return_address: Address
    bank_liquidation_address: Address


class LoanCreate(Strict):
    miner_party_id: Id
    arbiter_party_id: Id
    terms: LoanTermsIn


class HDKeyIn(Strict):
    kind: Literal["hd"]
    key: Annotated[str, Text(300)]


class HSMPublicKeyIn(Strict):
    """An HSM key generated elsewhere, registered by its compressed public key."""

    kind: Literal["hsm"]
    public_key: Annotated[str, Text(200)]


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
