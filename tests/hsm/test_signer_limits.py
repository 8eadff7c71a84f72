"""Attacks on the signer's limits, in worlds configured for them (both transports each):

- velocity (HSM_DAILY_LIMIT_SATS = 1,000,000): a 4-eyes release above the limit, a
  second release that would bring the last 24 hours above it, an automatic liquidation
  and a 4-eyes partial liquidation above it -> `velocity`;
- stale valuations (HSM_VALUATION_MAX_AGE_SECONDS = 1): an automatic liquidation, and
  4-eyes liquidation and partial liquidation statements, on a valuation older than that
  -> `valuation_stale`.

7 distinct attacks (x 2 transports). Each: the typed refusal with its check, zero
C_Sign calls during the attack, and the refusal in the signer's decision log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from support.signer_world import Loan, SignerWorld, in_process_world, matured, serve_world

from hsm.signer import PolicyViolation
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed
from regtest.softhsm import SoftHsmToken
from regtest.wait import wait_until

pytestmark = [pytest.mark.node, pytest.mark.hsm]

DAILY_LIMIT_SATS = 1_000_000


@pytest.fixture(scope="module", params=["in-process", "hsm-serve"])
def limited_world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    regtest_node: RegtestNode,
    softhsm_token: SoftHsmToken,
    module_feed: PriceFeed,
) -> Iterator[SignerWorld]:
    """A signer whose daily limit is 1,000,000 sats."""
    yield from _world(
        request.param,
        tmp_path_factory,
        regtest_node,
        softhsm_token,
        module_feed,
        HSM_DAILY_LIMIT_SATS=str(DAILY_LIMIT_SATS),
    )


@pytest.fixture(scope="module", params=["in-process", "hsm-serve"])
def impatient_world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    regtest_node: RegtestNode,
    softhsm_token: SoftHsmToken,
    module_feed: PriceFeed,
) -> Iterator[SignerWorld]:
    """A signer whose valuations are good for 1 second."""
    yield from _world(
        request.param,
        tmp_path_factory,
        regtest_node,
        softhsm_token,
        module_feed,
        HSM_VALUATION_MAX_AGE_SECONDS="1",
    )


def _world(
    transport: str,
    tmp_path_factory: pytest.TempPathFactory,
    node: RegtestNode,
    token: SoftHsmToken,
    feed: PriceFeed,
    **extra: str,
) -> Iterator[SignerWorld]:
    base = tmp_path_factory.mktemp(f"limits-{transport}")
    if transport == "in-process":
        with in_process_world(base, node, feed, token, **extra) as world:
            yield world
    else:
        with serve_world(base, node, feed, **extra) as world:
            yield world


def refusals(world: SignerWorld, loan_ref: str, check: str) -> int:
    registry = world.registry()
    try:
        return sum(
            1 for d in registry.decisions(loan_ref) if d.decision == "refused" and d.check == check
        )
    finally:
        if world.transport == "hsm-serve":
            registry.close()


def assert_refused(
    world: SignerWorld, loan: Loan, check: str, call: Callable[[], object]
) -> PolicyViolation:
    logged = refusals(world, loan.loan_ref, check)
    before = world.bank_signatures()
    with pytest.raises(PolicyViolation) as info:
        call()
    assert world.bank_signatures() == before, "the token signed during an attack"
    assert info.value.check == check, f"{info.value.check}: {info.value.reason}"
    assert refusals(world, loan.loan_ref, check) == logged + 1, "the refusal is not logged"
    return info.value


def matured_valued(world: SignerWorld, sats: int) -> tuple[Loan, dict[str, Any]]:
    """A matured loan (`support.signer_world.matured`) and the signer's liquidate verdict."""
    loan = matured(world, sats)
    valuation = world.client.valuation(loan.loan_ref)
    assert valuation["verdict"] == "liquidate", valuation
    return loan, valuation


def margin_called(world: SignerWorld, sats: int) -> tuple[Loan, dict[str, Any]]:
    principal = sats * 8 * 8_125 // 10_000  # LTV 81.25 % at 8M RUB/BTC, in kopecks
    loan = world.register_loan(principal_kopecks=principal)
    world.fund(loan, sats)
    valuation = world.client.valuation(loan.loan_ref)
    assert valuation["verdict"] == "margin_call", valuation
    return loan, valuation


def four_eyes(
    world: SignerWorld, loan: Loan, action: str, psbt: str, valuation_id: str | None = None
) -> Callable[[], object]:
    prepared = world.prepare(loan, action, psbt, valuation_id)
    return lambda: world.client.sign(
        loan.loan_ref,
        action,
        psbt,
        nonce=prepared["nonce"],
        approvals=world.approvals(prepared["statement"]),
    )


# --------------------------------------------------------------------------- velocity


def test_a_release_above_the_daily_limit(limited_world: SignerWorld) -> None:
    world = limited_world
    loan = world.register_loan()
    world.fund(loan, DAILY_LIMIT_SATS + 500_000)
    refusal = assert_refused(
        world, loan, "velocity", four_eyes(world, loan, "release", world.release_psbt(loan))
    )
    assert str(DAILY_LIMIT_SATS) in refusal.reason


def test_a_second_release_that_brings_the_day_over_the_limit(limited_world: SignerWorld) -> None:
    world = limited_world
    first, second = world.register_loan(), world.register_loan()
    world.fund(first, 600_000)
    world.fund(second, 600_000)
    before = world.bank_signatures()
    four_eyes(world, first, "release", world.release_psbt(first))()  # under the limit: signed
    assert world.bank_signatures() == before + 1
    assert world.client.health()["used_last_24h_sats"] >= 600_000
    assert_refused(
        world, second, "velocity", four_eyes(world, second, "release", world.release_psbt(second))
    )


def test_an_automatic_liquidation_above_the_daily_limit(limited_world: SignerWorld) -> None:
    world = limited_world
    loan, valuation = matured_valued(world, DAILY_LIMIT_SATS + 200_000)
    psbt = world.liquidation_psbt(loan, valuation)
    assert_refused(
        world,
        loan,
        "velocity",
        lambda: world.client.sign(
            loan.loan_ref,
            "liquidation",
            psbt,
            automatic=True,
            valuation_id=valuation["valuation_id"],
        ),
    )


def test_a_partial_liquidation_above_the_daily_limit(limited_world: SignerWorld) -> None:
    world = limited_world
    loan, valuation = margin_called(world, DAILY_LIMIT_SATS + 200_000)
    psbt = world.partial_psbt(loan, valuation, change_index=2)
    assert_refused(
        world,
        loan,
        "velocity",
        four_eyes(world, loan, "partial_liquidation", psbt, valuation["valuation_id"]),
    )


# --------------------------------------------------------------------------- stale valuations


def _aged(valuation: dict[str, Any]) -> None:
    """Wait (polling the wall clock, no fixed sleep) until the valuation is over 1 s old."""
    at = datetime.fromisoformat(valuation["at"].replace("Z", "+00:00"))
    wait_until(
        lambda: datetime.now(UTC) - at > timedelta(seconds=1.5),
        timeout=10,
        message="the valuation to age",
    )


def test_an_automatic_liquidation_on_a_stale_valuation(impatient_world: SignerWorld) -> None:
    world = impatient_world
    loan, valuation = matured_valued(world, 1_000_000)
    psbt = world.liquidation_psbt(loan, valuation)
    _aged(valuation)
    refusal = assert_refused(
        world,
        loan,
        "valuation_stale",
        lambda: world.client.sign(
            loan.loan_ref,
            "liquidation",
            psbt,
            automatic=True,
            valuation_id=valuation["valuation_id"],
        ),
    )
    assert "ask for a new one" in refusal.reason


def test_a_liquidation_statement_on_a_stale_valuation(impatient_world: SignerWorld) -> None:
    world = impatient_world
    loan, valuation = matured_valued(world, 1_000_000)
    psbt = world.liquidation_psbt(loan, valuation)
    _aged(valuation)
    assert_refused(
        world,
        loan,
        "valuation_stale",
        lambda: world.prepare(loan, "liquidation", psbt, valuation["valuation_id"]),
    )


def test_a_partial_liquidation_statement_on_a_stale_valuation(
    impatient_world: SignerWorld,
) -> None:
    world = impatient_world
    loan, valuation = margin_called(world, 1_000_000)
    psbt = world.partial_psbt(loan, valuation, change_index=2)
    _aged(valuation)
    assert_refused(
        world,
        loan,
        "valuation_stale",
        lambda: world.prepare(loan, "partial_liquidation", psbt, valuation["valuation_id"]),
    )
