"""The console with the real node: a deposit confirms while the miner's page is open, and
a margin call's banner names the top-up that cures it (paid, it does)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect
from sqlmodel import Session
from support.console import Console, screenshot
from support.lending import funded_loan, request, sign

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
    chart = miner.page.request.get(f"{console.url}/console/loans/{lid}/chart.svg")
    assert chart.status == 200 and chart.headers["content-type"] == "image/svg+xml"
    assert "LTV %" in chart.text()  # pygal inlines a config script: it never runs (below)
    assert "default-src 'none'" in chart.headers["content-security-policy"]
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
    assert miner.page.evaluate("document.getElementById('chart').naturalWidth") > 0
    screenshot(miner.page, "loan-miner-cured")


def _confirmed_sats(console: Console, lid: int) -> int:
    loan: dict[str, Any] = console.world.call("miner", "GET", f"/v1/loans/{lid}").json()
    return int(loan["collateral"]["confirmed_sats"])


def test_a_release_is_signed_through_the_console_and_the_page_follows_it_to_confirmed(
    node_console: Console,
    regtest_node: RegtestNode,
    console_watcher: Watcher,
    tmp_path: Path,
) -> None:
    """The miner downloads the .psbt file, signs it on their device (a software HD signer
    here) and uploads the file; the bank's operator the same with the base64 text, after
    an approver's approval (the API's route; this loan's bank key is a software key, so
    no signer statement: passkey approvals are tests/console/test_console_approvals.py).
    At quorum the service broadcasts; the request page follows to `confirmed`."""
    console = node_console
    funded = funded_loan(console.world, regtest_node, console_watcher, hsm_bank=False)
    lid = funded.loan["id"]
    req = request(console.world, "bank_operator", lid, action="release")
    rid = req["id"]
    miner = console.enrol("miner")
    miner.page.goto(f"{console.url}/console/loans")
    miner.page.click(f"#waiting a[href='/console/requests/{rid}']")
    labels = miner.page.inner_text("#outputs")
    assert "the miner's return address" in labels
    assert funded.loan["terms"]["miner_return_address"] in labels
    screenshot(miner.page, "request-miner")
    with miner.page.expect_download() as download:
        miner.page.click("#psbt-file")
    unsigned = Path(download.value.path()).read_bytes()
    signed = sign(base64.b64encode(unsigned).decode(), funded.roots["miner"])
    signed_file = tmp_path / "signed.psbt"
    signed_file.write_bytes(base64.b64decode(signed))
    csrf = miner.page.get_attribute("#upload input[name=csrf]", "value")
    miner.page.set_input_files("#psbt-upload", str(signed_file))
    miner.page.click("#upload-submit")
    miner.page.wait_for_url(f"{console.url}/console/requests/{rid}")
    assert miner.page.inner_text("#req-signed") == "miner"
    assert miner.page.locator("#upload").count() == 0  # signed: nothing more to sign
    # The same file again adds nothing: refused, with a page that says so.
    again = httpx.post(
        f"{console.url}/console/requests/{rid}/signatures",
        data={"csrf": csrf or ""},
        files={"psbt": ("signed.psbt", signed_file.read_bytes())},
        cookies={"console_session": _cookie(miner.context.cookies())},
        headers={"Origin": console.url},
    )
    assert again.status_code == 422 and "Nothing was changed" in again.text, again.text

    approved = console.world.call("bank_approver", "POST", f"/v1/signing-requests/{rid}/approve")
    assert approved.status_code == 200, approved.text
    operator = console.enrol("bank_operator")
    operator.page.goto(f"{console.url}/console/requests/{rid}")
    with operator.page.expect_download() as download:
        operator.page.click("#psbt-base64")
    text_file = tmp_path / "bank.psbt.txt"
    text_file.write_text(sign(Path(download.value.path()).read_text(), funded.roots["bank"]))
    watching = miner.context.new_page()  # the miner's tab, left open on the request
    watching.goto(f"{console.url}/console/requests/{rid}")
    watching.evaluate("window.__samePage = true")
    operator.page.set_input_files("#psbt-upload", str(text_file))
    operator.page.click("#upload-submit")
    operator.page.wait_for_url(f"{console.url}/console/requests/{rid}")
    assert operator.page.inner_text("#req-state") == "broadcast"
    assert req["unsigned_txid"] in regtest_node.rpc.get_raw_mempool()

    regtest_node.mine(1)
    _until(console_watcher, lambda: _state(console, lid) == "released")
    expect(watching.locator("#req-state")).to_have_text("confirmed", timeout=15_000)
    assert watching.evaluate("window.__samePage") is True
    screenshot(watching, "request-confirmed")
    watching.goto(f"{console.url}/console/loans/{lid}")
    assert watching.inner_text("#loan-state") == "released"


def _cookie(cookies: Any) -> str:
    return str(next(c["value"] for c in cookies if c["name"] == "console_session"))
