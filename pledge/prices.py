"""What counts as a BTC/RUB price, for the service and the bank's signer alike.

A price decides whether a client's collateral is sold, so both sides refuse the same
nonsense (NaN, infinities, zero, negatives, absurd magnitudes, more precision than any
sum or mean of prices can carry exactly) with the same words.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final

__all__ = ["MAX_DECIMAL_PLACES", "MAX_PRICE", "MIN_PRICE", "price_problem"]

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
