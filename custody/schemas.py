"""Rules every request body shares. Integers are strict: a float or a string where sats or kopecks
are expected is refused, never coerced; prices are decimal strings."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
)

MAX_SATS = 21_000_000 * 100_000_000


MAX_KOPECKS = 10**17


Sats = Annotated[StrictInt, Field(gt=0, le=MAX_SATS)]


def no_float(value: object) -> object:
    """Prices arrive as strings (or integers): a JSON float has already lost digits."""
    if isinstance(value, float):
        raise ValueError("send the price as a decimal string, not a JSON number with a fraction")
    return value


Price = Annotated[Decimal, BeforeValidator(no_float), Field(gt=0, max_digits=30, decimal_places=8)]


Bps = Annotated[StrictInt, Field(gt=0, le=10_000)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
