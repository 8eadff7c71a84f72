"""How collateral is divided when it moves. Pure integer arithmetic on sats and kopecks.

The rounding rule (one place, tested):
- the bank's share is the debt converted at the recorded price and rounded UP to the
  next satoshi: the bank is never paid less than it is owed, and the rounding is
  less than one satoshi;
- the fee is the fee rate times the worst-case size, rounded up;
- the miner gets everything else, to the satoshi;
- an output that would fall below its dust limit is not created: its amount goes to
  the fee, and the split says so in `notes`;
- and always: inputs == sum(outputs) + fee, exactly (`Split.__post_init__` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from pledge.errors import (
    CollateralBelowFee,
    FullLiquidationNeeded,
    InvalidInput,
    NoConfirmedCollateral,
    NothingToSell,
)

SATS_PER_BTC = 100_000_000
KOPECKS_PER_RUB = 100


def sats_for_kopecks(kopecks: int, price_rub_per_btc: Decimal) -> int:
    """Sats worth `kopecks` at the price, rounded up (what the bank must receive)."""
    if price_rub_per_btc <= 0:
        raise InvalidInput("price must be positive", field="price_rub_per_btc")
    value = Decimal(kopecks) * SATS_PER_BTC / (price_rub_per_btc * KOPECKS_PER_RUB)
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def kopecks_for_sats(sats: int, price_rub_per_btc: Decimal) -> int:
    """Kopecks that `sats` are worth at the price, rounded down (what the debtor is credited)."""
    value = Decimal(sats) * price_rub_per_btc * KOPECKS_PER_RUB / SATS_PER_BTC
    return int(value.to_integral_value(rounding=ROUND_FLOOR))


def fee_for(vsize: int, fee_rate_sat_vb: Decimal) -> int:
    return int((Decimal(vsize) * fee_rate_sat_vb).to_integral_value(rounding=ROUND_CEILING))


def clamp_fee_rate(
    estimate: Decimal | None, *, floor: Decimal, ceiling: Decimal
) -> tuple[Decimal, str]:
    """The node's estimate held between a floor and a ceiling; says which applied."""
    if estimate is None:
        return floor, "no node estimate: floor used"
    if estimate < floor:
        return floor, f"node estimate {estimate} below floor {floor}"
    if estimate > ceiling:
        return ceiling, f"node estimate {estimate} above ceiling {ceiling}"
    return estimate, "node estimate"


@dataclass(frozen=True)
class Split:
    """Where the inputs go. Roles: 'miner_return', 'bank_liquidation', 'collateral_change'."""

    total_in: int
    outputs: dict[str, int]
    fee: int
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if any(v <= 0 for v in self.outputs.values()) or self.fee < 0:
            raise ValueError(f"non-positive amount in split {self}")
        if sum(self.outputs.values()) + self.fee != self.total_in:
            raise ValueError(f"split does not add up: {self}")


def _fold_dust(
    total_in: int, outputs: dict[str, int], fee: int, dust: dict[str, int], notes: list[str]
) -> Split:
    kept: dict[str, int] = {}
    for role, amount in outputs.items():
        if amount < dust[role]:
            if amount > 0:
                notes.append(
                    f"{role} output of {amount} sats is below dust ({dust[role]}): added to the fee"
                )
            fee += amount
        else:
            kept[role] = amount
    if not kept:
        raise CollateralBelowFee("every output would be dust: the collateral cannot pay the fee")
    return Split(total_in, kept, fee, notes)


def release_split(total_in: int, fee: int, miner_dust: int) -> Split:
    """Loan repaid: everything but the fee goes back to the miner."""
    if total_in - fee < miner_dust:
        raise CollateralBelowFee(
            f"the collateral ({total_in} sats) does not cover the fee ({fee} sats) plus dust"
        )
    return Split(total_in, {"miner_return": total_in - fee}, fee)


def liquidation_split(
    total_in: int,
    fee: int,
    debt_kopecks: int,
    price_rub_per_btc: Decimal,
    *,
    bank_dust: int,
    miner_dust: int,
) -> Split:
    """Pay the bank the debt at the price (rounded up), the surplus back to the miner.
    If the collateral after the fee cannot cover the debt, the bank takes all of it and
    the shortfall is stated."""
    available = total_in - fee
    if available <= 0:
        raise CollateralBelowFee(
            f"the collateral ({total_in} sats) does not cover the fee ({fee} sats)"
        )
    owed = sats_for_kopecks(debt_kopecks, price_rub_per_btc)
    notes: list[str] = [
        f"debt {debt_kopecks} kopecks at {price_rub_per_btc} RUB/BTC = {owed} sats (rounded up)"
    ]
    bank = min(owed, available)
    if bank < owed:
        shortfall = debt_kopecks - kopecks_for_sats(bank, price_rub_per_btc)
        notes.append(
            f"collateral short of the debt by {owed - bank} sats ({shortfall} kopecks remain owed)"
        )
    outputs = {"bank_liquidation": bank, "miner_return": available - bank}
    dust = {"bank_liquidation": bank_dust, "miner_return": miner_dust}
    return _fold_dust(total_in, outputs, fee, dust, notes)


def partial_liquidation_split(
    total_in: int,
    fee: int,
    debt_kopecks: int,
    price_rub_per_btc: Decimal,
    target_ltv_bps: int,
    *,
    bank_dust: int,
    change_dust: int,
) -> Split:
    """Sell just enough to bring LTV down to the target; the rest returns to the loan's
    own descriptor. Solves (D - X) / (C - f - X) = t for X, with D the debt in sats at the
    price and C the collateral: X = (D - t(C - f)) / (1 - t), rounded up."""
    if not 0 < target_ltv_bps < 10_000:
        raise InvalidInput("target LTV must be between 0 and 100%", field="target_ltv_bps")
    t = Decimal(target_ltv_bps) / 10_000
    debt_sats = Decimal(debt_kopecks) * SATS_PER_BTC / (price_rub_per_btc * KOPECKS_PER_RUB)
    remaining = total_in - fee
    sell_exact = (debt_sats - t * remaining) / (1 - t)
    if sell_exact <= 0:
        raise NothingToSell("LTV is already at or below the target: nothing to sell")
    sell = int(sell_exact.to_integral_value(rounding=ROUND_CEILING))
    change = remaining - sell
    if change < change_dust:
        raise FullLiquidationNeeded(
            "restoring the target LTV needs all the collateral: liquidate in full"
        )
    if sell < bank_dust:
        raise NothingToSell(f"the sale ({sell} sats) would be below dust: nothing worth selling")
    credited = kopecks_for_sats(sell, price_rub_per_btc)
    notes = [
        f"sell {sell} sats at {price_rub_per_btc} RUB/BTC, crediting {credited} kopecks, "
        f"to bring LTV to {target_ltv_bps} bps"
    ]
    return Split(total_in, {"bank_liquidation": sell, "collateral_change": change}, fee, notes)


def ltv_bps(debt_kopecks: int, collateral_sats: int, price_rub_per_btc: Decimal) -> int:
    """Debt / (collateral x price), in basis points, rounded up (the cautious side)."""
    if collateral_sats <= 0:
        raise NoConfirmedCollateral("no confirmed collateral: LTV is undefined")
    value = (
        Decimal(debt_kopecks)
        * SATS_PER_BTC
        * 10_000
        / (Decimal(collateral_sats) * price_rub_per_btc * KOPECKS_PER_RUB)
    )
    return int(value.to_integral_value(rounding=ROUND_CEILING))
