"""Price bodies: the desk's manual price and the latest price."""

from __future__ import annotations

from datetime import datetime

from pydantic import (
    AwareDatetime,
    BaseModel,
)

from custody.schemas import Price, Strict


class PriceSet(Strict):
    price_rub_per_btc: Price
    quoted_at: AwareDatetime | None = None


class PriceOut(BaseModel):
    price_rub_per_btc: str
    source: str
    quoted_at: datetime
    set_by: str
