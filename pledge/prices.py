"""What counts as a BTC/RUB price, for the service and the bank's signer alike.

A price decides whether a client's collateral is sold, so both sides refuse the same
nonsense (NaN, infinities, zero, negatives, absurd magnitudes, more precision than any
sum or mean of prices can carry exactly) with the same words.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Final

__all__ = [
    "MAX_DECIMAL_PLACES",
    "MAX_PRICE",
    "MIN_PRICE",
    "check_quote",
    "price_problem",
]

MAX_PRICE: Final = Decimal(10) ** 12  # RUB per BTC, exclusive: above is a unit or parsing slip
MIN_PRICE: Final = Decimal("0.00000001")
MAX_DECIMAL_PLACES: Final = 18


def price_problem(price: Decimal) -> str | None:
    """Why `price` cannot be a BTC/RUB price, or None when it can."""
    if not price.is_finite():
        return "is not a finite number"
    if price <= 0:
        return "must be positive"
    if price >= MAX_PRICE:
        return "is not below the sanity ceiling 10**12"
    if price < MIN_PRICE:
        return f"is below the smallest expressible price {MIN_PRICE:f}"
    exponent = price.normalize().as_tuple().exponent
    assert isinstance(exponent, int)  # finite, checked above
    if -exponent > MAX_DECIMAL_PLACES:
        return f"has more than {MAX_DECIMAL_PLACES} decimal places"
    return None


def check_quote(price: Decimal, source: str, quoted_at: datetime) -> datetime:
    """The invariants of any quote object, on either side: a Decimal price that is a
    price, a named source, an aware time. Returns the time in UTC. Raises TypeError or
    ValueError: these are programming errors (every producer validates its input first)."""
    if not isinstance(price, Decimal):
        raise TypeError("price_rub_per_btc must be a Decimal, never a float")
    problem = price_problem(price)
    if problem is not None:
        raise ValueError(f"price {problem}")
    if not source:
        raise ValueError("a quote needs a source")
    if quoted_at.tzinfo is None or quoted_at.utcoffset() is None:
        raise ValueError("quoted_at must be timezone-aware")
    return quoted_at.astimezone(UTC)
