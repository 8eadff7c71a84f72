"""The console with the real node: a deposit confirms while the miner's page is open, and
a margin call's banner names the top-up that cures it (paid, it does)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect
from sqlmodel import Session
from support.console import Console, screenshot

from custody.config import Settings
from custody.db.models import Loan
from custody.root import Root
from custody.watcher.service import Watcher
from regtest.node import RegtestNode
from regtest.wait import wait_until


@pytest.fixture
def console_watcher(node_console: Console, regtest_node: RegtestNode) -> Iterator[Watcher]:
    settings = Settings(
        network="regtest", watch_start_height=regtest_node.rpc.get_block_count() + 1
    )
    w = Root.assemble(settings, engine=node_console.world.engine, node=regtest_node.rpc).watcher()
    w.acquire()
    yield w
    w.release()


def _state(console: Console, loan_id: int) -> str:
    with Session(console.world.engine) as session:
        loan = session.get(Loan, loan_id)
        assert loan is not None
        return str(loan.state)


def _until(watcher: Watcher, done: Any) -> None:
    """Step the watcher until `done()` (a real poll of the node each time)."""
    wait_until(lambda: watcher.step() is not None and done(), timeout=60, interval=0.2)


def test_a_deposit_confirms_and_the_open_page_follows_then_the_margin_call_is_cured(
    node_console: Console, regtest_node: RegtestNode, console_watcher: Watcher
) -> None:
    console = node_console
    loan = console.world.funded_ready_loan()
    lid, address = loan["id"], loan["collateral_address"]
    miner = console.enrol("miner")
    miner.page.goto(f"{console.url}/console/loans/{lid}")
    assert miner.page.inner_text("#loan-state") == "awaiting_deposit"
    miner.page.evaluate("window.__samePage = true")

    regtest_node.faucet.pay(address, 50_000_000)
    regtest_node.mine(1)
    _until(console_watcher, lambda: _state(console, lid) == "active")
    # The page was not reloaded: its poll brought the new state and the confirmation in.
    expect(miner.page.locator("#loan-state")).to_have_text("active", timeout=15_000)
    assert miner.page.evaluate("window.__samePage") is True
    assert miner.page.inner_text("#deposits .confirmations") == "1 / 1"
    assert miner.page.inner_text("#deposits .deposit-state") == "confirmed"
    screenshot(miner.page, "loan-miner-confirmed")

    # The price falls: 375,000,000 RUB/BTC puts 150,000,000 RUB on 0.5 BTC at LTV 80 %,
    # above the margin call (75 %) and below liquidation (90 %).
    proposed = console.world.call(
        "bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": "375000000"}
    )
    assert proposed.status_code == 201, proposed.text
    confirmed = console.world.call(
        "bank_approver", "POST", f"/v1/prices/{proposed.json()['id']}/confirm"
    )
    assert confirmed.status_code == 200, confirmed.text
    risk = Root.assemble(console.world.settings, engine=console.world.engine).risk_engine()
    assert risk.run_once().margin_calls == [lid]

    miner.page.goto(f"{console.url}/console/loans")
    banner = miner.page.inner_text(f"#margin-call-{lid}")
    screenshot(miner.page, "dashboard-miner-margin-call")
    top_up = int(banner.split("Deposit ")[1].split(" sats")[0].replace(" ", ""))
    assert 0 < top_up < 50_000_000
    assert "by " in banner and "UTC" in banner  # the cure window's end
    # The banner's number is what cures it: paid and confirmed, the engine cures the loan.
    regtest_node.faucet.pay(address, top_up)
    regtest_node.mine(1)
    _until(console_watcher, lambda: _confirmed_sats(console, lid) == 50_000_000 + top_up)
    report = risk.run_once()
    assert report.cured == [lid], report
    miner.page.goto(f"{console.url}/console/loans/{lid}")
    assert miner.page.inner_text("#loan-state") == "active"
    assert miner.page.locator("#margin-call").count() == 0


def _confirmed_sats(console: Console, lid: int) -> int:
    loan: dict[str, Any] = console.world.call("miner", "GET", f"/v1/loans/{lid}").json()
    return int(loan["collateral"]["confirmed_sats"])
