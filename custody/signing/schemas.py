"""Signing request bodies: creating one, uploading signatures, bumping its fee, reading it."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    Field,
)

from custody.schemas import Bps, Name, Price, Strict, Text


class SigningRequestCreate(Strict):
    action: Literal["release", "dispute_release", "liquidation", "partial_liquidation"]
    fee_rate_sat_vb: Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=3)] | None = None
    price_rub_per_btc: Price | None = None
    price_source: Name | None = None
    target_ltv_bps: Bps | None = None


class SignatureUpload(Strict):
    psbt: Annotated[str, Text(2_000_000)]


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


class PsbtOut(BaseModel):
    psbt: str
    unsigned_txid: str
