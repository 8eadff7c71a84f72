"""Price bodies: a proposed manual price, and a manual price as its history shows it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    Field,
)

from custody.schemas import Price, Strict


def _in_utc(at: datetime) -> datetime:
    """Every time is kept in UTC; one that has no UTC (year 1 at +01:00) is refused."""
    try:
        return at.astimezone(UTC)
    except OverflowError:
        raise ValueError("the time is out of range") from None


class PriceSet(Strict):
    price_rub_per_btc: Price
    quoted_at: Annotated[AwareDatetime, AfterValidator(_in_utc)] | None = Field(
        default=None, description="When the price was true; default: now. Not in the future."
    )


class PriceOut(BaseModel):
    """A manual price: what, when it was true, and who proposed and who decided it (shown
    to bank staff, auditors and the admin only)."""

    id: int
    price_rub_per_btc: str
    source: str
    quoted_at: datetime
    state: Literal["proposed", "confirmed", "rejected", "expired", "legacy"] = Field(
        description="proposed (awaiting a second person), confirmed (in effect once it is "
        "the latest confirmed), rejected, expired (not confirmed in time), legacy (set by "
        "one person before prices needed two; never used)"
    )
    proposed_by: str
    proposed_at: datetime
    expires_at: datetime | None
    confirmed_by: str | None
    confirmed_at: datetime | None
    rejected_by: str | None
    rejected_at: datetime | None
