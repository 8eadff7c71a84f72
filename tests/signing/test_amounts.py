"""The split rules: exact sums, bank never short-changed, dust folded and said."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from pledge.amounts import (
    clamp_fee_rate,
    kopecks_for_sats,
    liquidation_split,
    ltv_bps,
    partial_liquidation_split,
    release_split,
    sats_for_kopecks,
)
from pledge.errors import Conflict

PRICE = Decimal("6000000")  # RUB per BTC


def test_conversion_rounds_in_the_stated_directions() -> None:
    # 1 kopeck at 6,000,000 RUB/BTC is 0.0166.. sats: the bank gets 1 sat.
    assert sats_for_kopecks(1, PRICE) == 1
    assert sats_for_kopecks(6_000_000_00, PRICE) == 100_000_000
    assert sats_for_kopecks(6_000_000_00 + 1, PRICE) == 100_000_001
    assert kopecks_for_sats(100_000_000, PRICE) == 6_000_000_00
    assert kopecks_for_sats(1, PRICE) == 6  # 6.0 kopecks


def test_liquidation_pays_exactly_the_debt_and_returns_the_surplus() -> None:
    split = liquidation_split(
        100_000_000, 1_000, 3_000_000_00, PRICE, bank_dust=330, miner_dust=294
    )
    assert split.outputs == {"bank_liquidation": 50_000_000, "miner_return": 49_999_000}
    assert split.fee == 1_000


def test_liquidation_short_of_debt_gives_the_bank_everything_and_says_so() -> None:
    split = liquidation_split(10_000_000, 1_000, 3_000_000_00, PRICE, bank_dust=330, miner_dust=294)
    assert split.outputs == {"bank_liquidation": 9_999_000}
    assert any("short of the debt" in n for n in split.notes)


def test_a_dust_surplus_goes_to_the_fee_and_is_noted() -> None:
    owed = sats_for_kopecks(3_000_000_00, PRICE)
    split = liquidation_split(
        owed + 1_000 + 200, 1_000, 3_000_000_00, PRICE, bank_dust=330, miner_dust=294
    )
    assert split.outputs == {"bank_liquidation": owed}
    assert split.fee == 1_200
    assert any("below dust" in n for n in split.notes)


@pytest.mark.parametrize("seed", range(5))
def test_random_splits_always_add_up(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(2_000):
        total = rng.randrange(10_000, 10**10)
        fee = rng.randrange(200, 50_000)
        debt = rng.randrange(1, 10**12)
        price = Decimal(rng.randrange(1_000_000, 20_000_000)) + Decimal(rng.randrange(100)) / 100
        try:
            split = liquidation_split(total, fee, debt, price, bank_dust=330, miner_dust=294)
        except Conflict:
            continue
        assert sum(split.outputs.values()) + split.fee == total
        bank = split.outputs.get("bank_liquidation", 0)
        if total - fee - sats_for_kopecks(debt, price) >= 294:
            # Enough collateral: the bank gets at least the debt, and less than 1 sat more.
            assert kopecks_for_sats(bank, price) >= debt - kopecks_for_sats(1, price)
            assert bank == sats_for_kopecks(debt, price)


def test_release_returns_everything_but_the_fee() -> None:
    assert release_split(50_000_000, 700, 294).outputs == {"miner_return": 49_999_300}
    with pytest.raises(Conflict):
        release_split(900, 700, 294)


@pytest.mark.parametrize("target", [5_000, 6_000, 7_000])
def test_partial_liquidation_restores_the_target_ltv(target: int) -> None:
    collateral, fee = 100_000_000, 1_500
    debt = 4_800_000_00  # 80% LTV at 6,000,000 RUB/BTC
    assert ltv_bps(debt, collateral, PRICE) == 8_000
    split = partial_liquidation_split(
        collateral, fee, debt, PRICE, target, bank_dust=330, change_dust=330
    )
    sold = split.outputs["bank_liquidation"]
    left = split.outputs["collateral_change"]
    assert sold + left + fee == collateral
    new_debt = debt - kopecks_for_sats(sold, PRICE)
    after = ltv_bps(new_debt, left, PRICE)
    assert target - 1 <= after <= target  # at or just under: X was rounded up
    # One satoshi less would leave LTV above the target.
    assert ltv_bps(debt - kopecks_for_sats(sold - 2, PRICE), left + 2, PRICE) > target


def test_partial_liquidation_refuses_when_nothing_or_everything_must_be_sold() -> None:
    with pytest.raises(Conflict, match="already at or below"):
        partial_liquidation_split(
            100_000_000, 1_000, 1_000_000_00, PRICE, 6_000, bank_dust=330, change_dust=330
        )
    with pytest.raises(Conflict, match="liquidate in full"):
        partial_liquidation_split(
            100_000_000, 1_000, 6_000_000_00, PRICE, 6_000, bank_dust=330, change_dust=330
        )


def test_fee_rate_is_clamped_and_says_why() -> None:
    floor, ceiling = Decimal(2), Decimal(200)
    assert clamp_fee_rate(None, floor=floor, ceiling=ceiling)[0] == floor
    assert clamp_fee_rate(Decimal(1), floor=floor, ceiling=ceiling)[0] == floor
    assert clamp_fee_rate(Decimal(900), floor=floor, ceiling=ceiling)[0] == ceiling
    assert clamp_fee_rate(Decimal(12), floor=floor, ceiling=ceiling) == (
        Decimal(12),
        "node estimate",
    )
