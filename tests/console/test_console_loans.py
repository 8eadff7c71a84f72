"""A loan made in the browser: the operator opens it from the dashboard's form, each seat
registers its own key on the loan page, and the miner then sees the deposit address. A
principal in fractions of a kopeck is refused, not rounded."""

from __future__ import annotations

import html
from datetime import UTC, datetime, timedelta

from playwright.sync_api import Page
from sqlmodel import Session, func, select
from support.console import Console, screenshot
from support.world import BANK_LIQUIDATION, MINER_RETURN, hd_key

from custody.console.views import EARLIER_ADDRESSES, TIMELINE_EVENTS
from custody.db.models import Loan


def _fill_loan_form(console: Console, page: Page, principal_rub: str) -> None:
    ids = console.world.party_ids
    maturity = (datetime.now(UTC) + timedelta(days=180)).replace(microsecond=0).isoformat()
    for name, value in (
        ("miner_party_id", str(ids["miner"])),
        ("arbiter_party_id", str(ids["arbiter"])),
        ("principal_rub", principal_rub),
        ("maturity_at", maturity),
        ("required_collateral_sats", "50000000"),
        ("miner_return_address", MINER_RETURN),
        ("bank_liquidation_address", BANK_LIQUIDATION),
    ):
        page.fill(f"#new-loan input[name={name}]", value)


def _loans(console: Console) -> int:
    with Session(console.world.engine) as s:
        return int(s.exec(select(func.count()).select_from(Loan)).one())


def test_the_operator_opens_a_loan_and_each_seat_registers_its_key_in_the_browser(
    console: Console,
) -> None:
    operator = console.enrol("bank_operator")
    page = operator.page
    page.goto(f"{console.url}/console/loans")
    _fill_loan_form(console, page, "1500000.00")
    page.click("#new-loan button[type=submit]")
    page.wait_for_url(f"{console.url}/console/loans/*")
    loan_id = int(page.url.rsplit("/", 1)[1].split("#")[0])
    assert page.inner_text("#loan-state") == "draft"

    for who, seat in (("miner", "miner"), ("arbiter", "arbiter")):
        person = console.enrol(who)
        person.page.goto(f"{console.url}/console/loans/{loan_id}")
        assert person.page.locator(".key-form").count() == 1  # only their own seat
        person.page.fill(".key-form input[name=key]", hd_key())
        person.page.click(".key-form button[type=submit]")
        person.page.wait_for_selector(f"#terms li:has-text('{seat}: hd')")
    page.goto(f"{console.url}/console/loans/{loan_id}")
    page.fill(".key-form input[name=key]", hd_key())
    page.click(".key-form:has(input[name=key]) button[type=submit]")
    page.wait_for_selector("#terms li:has-text('bank: hd')")
    screenshot(page, "loan-keys-registered")

    loan = console.world.call("miner", "GET", f"/v1/loans/{loan_id}").json()
    assert loan["state"] == "awaiting_deposit"
    assert loan["terms"]["principal_kopecks"] == 150_000_000
    miner = console.enrol("other_miner")  # another miner: not theirs
    answer = miner.page.goto(f"{console.url}/console/loans/{loan_id}")
    assert answer is not None and answer.status == 404


def test_a_principal_in_fractions_of_a_kopeck_is_refused_not_rounded(console: Console) -> None:
    operator = console.enrol("bank_operator")
    page = operator.page
    page.goto(f"{console.url}/console/loans")
    _fill_loan_form(console, page, "1500000.005")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.click("#new-loan button[type=submit]")
    assert posted.value.status == 422
    message = html.unescape(page.inner_text("#error-message"))
    assert "at most two decimals" in message
    assert _loans(console) == 0


def test_the_chart_starts_at_the_price_in_effect_when_the_loan_opened(console: Console) -> None:
    world = console.world
    proposed = world.call(
        "bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": "6000000"}
    )
    assert proposed.status_code == 201, proposed.text
    pid = proposed.json()["id"]
    assert world.call("bank_approver", "POST", f"/v1/prices/{pid}/confirm").status_code == 200
    loan_id = world.create_loan()["id"]  # opened after the only confirmed price
    miner = console.enrol("miner")
    chart = miner.page.request.get(f"{console.url}/console/loans/{loan_id}/chart.svg")
    assert chart.status == 200
    svg = chart.text()
    assert 'class="no_data"' not in svg  # pygal's "No data" text, drawn for an empty chart
    assert svg.count("6000000") >= 2  # the opening point and now


def test_a_loan_page_shows_the_newest_address_with_its_qr_code_and_the_latest_earlier_ones(
    console: Console,
) -> None:
    """A loan that handed out 13 addresses: its page draws one QR code, the newest's (the
    one to pay), lists the 10 before it as text and says how many older ones the API has;
    its timeline stops at the latest 50 events."""
    loan = console.world.keyed_loan()
    addresses = [loan["collateral_address"]]
    for _ in range(12):
        r = console.world.call("miner", "POST", f"/v1/loans/{loan['id']}/addresses")
        assert r.status_code == 201, r.text
        addresses.append(r.json()["address"])
    miner = console.enrol("miner")
    miner.page.goto(f"{console.url}/console/loans/{loan['id']}")
    assert miner.page.locator(".qr").count() == 1
    qr = miner.page.locator("img.qr")
    assert qr.get_attribute("src", timeout=1000) == (
        f"/console/loans/{loan['id']}/addresses/12/qr.svg"
    )
    assert qr.evaluate("img => img.complete && img.naturalWidth > 0")  # it loaded
    assert miner.page.inner_text("#address-12") == addresses[12]
    listed = miner.page.locator("#earlier-addresses code.addr")
    assert listed.count() == EARLIER_ADDRESSES
    assert [listed.nth(i).text_content() for i in range(EARLIER_ADDRESSES)] == addresses[11:1:-1]
    assert miner.page.locator("#address-1").count() == 0
    summary = miner.page.inner_text("#earlier-addresses summary")
    assert summary == "Earlier addresses, still watched (12)"
    miner.page.click("#earlier-addresses summary")
    assert "and 2 older" in miner.page.inner_text("#earlier-addresses")
    assert "--index 12" in miner.page.inner_text("#check-on-device")
    # Few events so far: all of them, and no note that some are left out.
    assert miner.page.locator("#timeline-cut").count() == 0
    for _ in range(TIMELINE_EVENTS):
        r = console.world.call("miner", "POST", f"/v1/loans/{loan['id']}/addresses")
        assert r.status_code == 201, r.text
    miner.page.reload()
    assert miner.page.locator("#timeline li").count() == TIMELINE_EVENTS
    assert "latest 50 events" in miner.page.inner_text("#timeline-cut")
