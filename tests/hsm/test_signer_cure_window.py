"""The cure window as the signer sees it with its own clock: an automatic liquidation on
an expired cure window needs the signer to have watched the margin call all along. A
hostile service that stops asking while the loan is cured cannot make an old margin call
count as a whole window later. (In process: the test moves the signer's clock.)"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.signer_world import SignerWorld, in_process_world

from hsm.client import InProcessTransport
from hsm.core import SignerCore
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed, price_feed
from regtest.softhsm import SoftHsmToken

pytestmark = [pytest.mark.node, pytest.mark.hsm]


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def setup(
    tmp_path: Path, regtest_node: RegtestNode, softhsm_token: SoftHsmToken
) -> Iterator[tuple[SignerWorld, SignerCore, Clock, PriceFeed]]:
    with (
        price_feed("8000000") as feed,
        in_process_world(tmp_path, regtest_node, feed, softhsm_token) as world,
    ):
        transport = world.client.transport
        assert isinstance(transport, InProcessTransport)
        clock = Clock()
        transport.core.clock = clock
        yield world, transport.core, clock, feed


def _at(clock: Clock, feed: PriceFeed, minutes: float, price: str) -> None:
    clock.now += timedelta(minutes=minutes)
    feed.set(price, quoted_at=clock.now)  # the feed quotes at the signer's (moved) time


def test_a_watched_margin_call_expires_into_a_liquidation(
    setup: tuple[SignerWorld, SignerCore, Clock, PriceFeed],
) -> None:
    world, _, clock, feed = setup
    loan = world.register_loan(principal_kopecks=6_500_000, cure_window_hours=1)
    world.fund(loan, 1_000_000)
    _at(clock, feed, 0, "8000000")  # LTV 81.25 %: margin call, below liquidation
    first = world.client.valuation(loan.loan_ref)
    assert first["verdict"] == "margin_call"
    for _ in range(6):  # watched every 10 minutes for the hour
        _at(clock, feed, 10, "8000000")
        last = world.client.valuation(loan.loan_ref)
    assert last["verdict"] == "liquidate", last
    assert any("cure window" in r and "expired" in r for r in last["reasons"])


def test_an_unwatched_gap_restarts_the_cure_window(
    setup: tuple[SignerWorld, SignerCore, Clock, PriceFeed],
) -> None:
    world, _, clock, feed = setup
    loan = world.register_loan(principal_kopecks=6_500_000, cure_window_hours=1)
    world.fund(loan, 1_000_000)
    _at(clock, feed, 0, "8000000")
    assert world.client.valuation(loan.loan_ref)["verdict"] == "margin_call"
    # the service stops asking for 61 minutes (the loan might have been cured meanwhile)
    _at(clock, feed, 61, "8000000")
    later = world.client.valuation(loan.loan_ref)
    assert later["verdict"] == "margin_call", later
    assert any("starts again" in r for r in later["reasons"])
    assert later["margin_call_seen_at"] == later["at"]
    # an automatic liquidation on that valuation is refused: the signer says why
    from hsm.signer import PolicyViolation

    before = world.bank_signatures()
    with pytest.raises(PolicyViolation) as refused:
        world.client.sign(
            loan.loan_ref,
            "liquidation",
            world.liquidation_psbt(loan, later),
            automatic=True,
            valuation_id=later["valuation_id"],
        )
    assert refused.value.check == "not_liquidatable"
    assert world.bank_signatures() == before


def test_a_cure_seen_by_the_signer_closes_the_window(
    setup: tuple[SignerWorld, SignerCore, Clock, PriceFeed],
) -> None:
    world, _, clock, feed = setup
    loan = world.register_loan(principal_kopecks=6_500_000, cure_window_hours=1)
    world.fund(loan, 1_000_000)
    _at(clock, feed, 0, "8000000")
    assert world.client.valuation(loan.loan_ref)["verdict"] == "margin_call"
    _at(clock, feed, 10, "9000000")  # LTV 72 %: cured
    cured = world.client.valuation(loan.loan_ref)
    assert cured["verdict"] == "ok" and cured["margin_call_seen_at"] is None
    _at(clock, feed, 10, "8000000")  # back in margin call: a new window starts now
    again = world.client.valuation(loan.loan_ref)
    assert again["verdict"] == "margin_call" and again["margin_call_seen_at"] == again["at"]
