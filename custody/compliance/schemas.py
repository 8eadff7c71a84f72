"""Compliance request and response bodies. The numbers' rules (INN, OGRN check digits, the
register entry a legal form needs) are the kernel's (`pledge.kyc`): a body only bounds them,
so a wrong check digit answers 422 naming its field, like any bad value."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictInt

from custody.schemas import Name, Strict, Text

Digits = Annotated[str, Text(15, pattern=r"^[0-9]+$")]
DocumentKind = Literal[
    "register_extract", "energy_contract", "charter", "hosting_contract", "other"
]


class MinerRecordIn(Strict):
    legal_form: Literal["legal_entity", "individual_entrepreneur", "individual"]
    inn: Digits
    ogrn: Digits | None = None  # OGRN (legal entity) or OGRNIP (individual entrepreneur)
    register_number: Annotated[str, Text(64)] | None = None
    register_date: date | None = None
    register_status: Literal["active", "suspended", "excluded"] | None = None
    region: Annotated[str, Text(2, pattern=r"^[0-9]{2}$")]
    monthly_energy_kwh: Annotated[StrictInt, Field(ge=0, le=10**12)]
    data_centre_name: Name | None = None
    data_centre_inn: Digits | None = None


class FlagOut(BaseModel):
    code: str
    reason: str


class DocumentOut(BaseModel):
    id: int
    party_id: int
    kind: str
    content_type: str
    filename: str | None
    size: int
    sha256: str
    uploaded_by: str
    uploaded_at: datetime


class ReviewOut(BaseModel):
    id: int
    decision: str
    reason: str
    flags: list[str]
    reviewer: str
    created_at: datetime


class MinerRecordOut(BaseModel):
    party_id: int
    legal_form: str
    inn: str
    ogrn: str | None
    register_number: str | None
    register_date: date | None
    register_status: str | None
    region: str
    monthly_energy_kwh: int
    data_centre_name: str | None
    data_centre_inn: str | None
    version: int
    digest: str  # what a review approves: send it back in the review
    updated_by: str
    updated_at: datetime
    documents: list[DocumentOut]
    # `flags` are those of any loan from today on (a loan's own period is checked at the
    # gate); `state`: pending | approved | rejected for the current content.
    flags: list[FlagOut]
    approvals_needed: int
    state: str
    reviews: list[ReviewOut]  # of the current content


class ReviewIn(Strict):
    decision: Literal["approve", "reject"]
    reason: Annotated[str, Text(2000)]
    digest: Annotated[str, Text(64, pattern=r"^[0-9a-f]{64}$")]  # the content reviewed


class MiningBanIn(Strict):
    region: Annotated[str, Text(2, pattern=r"^[0-9]{2}$")]
    starts_on: date
    ends_on: date | None = None
    months: list[Annotated[StrictInt, Field(ge=1, le=12)]] = Field(default=[], max_length=12)
    note: Annotated[str, Text(500)] | None = None


class MiningBanOut(BaseModel):
    id: int
    region: str
    starts_on: date
    ends_on: date | None
    months: list[int]
    note: str
    created_by: str
