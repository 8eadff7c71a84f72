"""The console through a real browser: passkeys on a virtual authenticator, the service
behind uvicorn, and the refusals a browser's user (or another site) could try."""

from __future__ import annotations

import io
import re
from datetime import timedelta

import httpx
import pytest
import zxingcpp
from PIL import Image
from sqlmodel import Session, col, select
from support.console import Console, Person, new_person, screenshot
from support.world import BANK_LIQUIDATION, MINER_RETURN, WHO

from custody.db.models import AuditEvent, ConsoleInvitation, ConsolePasskey, ConsoleSession, Loan
from custody.db.session import transaction

PEOPLE = [w for w in WHO if not w.startswith("other_")]


def _audit_count(console: Console) -> int:
    with Session(console.world.engine) as session:
        return len(session.exec(select(AuditEvent.id)).all())


@pytest.mark.parametrize("who", PEOPLE)
def test_each_role_registers_a_passkey_and_signs_in_with_it(console: Console, who: str) -> None:
    person = console.enrol(who)
    assert who.replace("_", "") in person.page.inner_text("#who").replace("_", "")
    (credential,) = person.credentials()
    assert credential["isResidentCredential"] is True
    # The database holds the credential's public part, never a token in the clear.
    with Session(console.world.engine) as session:
        (stored,) = session.exec(select(ConsolePasskey)).all()
        (invitation,) = session.exec(select(ConsoleInvitation)).all()
        (row,) = session.exec(select(ConsoleSession)).all()
    cookie = next(c for c in person.context.cookies() if c["name"] == "console_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["value"] not in (row.token_hash, stored.public_key)
    assert invitation.used_at is not None
    # Sign out, then sign in again with the same passkey.
    person.page.click("#sign-out")
    person.page.wait_for_url(f"{console.url}/console/sign-in")
    with Session(console.world.engine) as session:
        assert session.exec(select(ConsoleSession)).all() == []
    console.sign_in(person)
    assert "Sign out" in person.page.content()
    with Session(console.world.engine) as session:
        (again,) = session.exec(select(ConsolePasskey)).all()
    assert again.last_used_at is not None
    if who == "bank_operator":
        screenshot(person.page, "dashboard-staff")


def test_an_invitation_works_once(console: Console) -> None:
    link = console.invitation("miner")
    first = new_person(console.browser, "miner")
    first.page.goto(link)
    first.page.click("#register")
    first.page.wait_for_url(f"{console.url}/console/loans")
    second = new_person(console.browser, "miner")
    answer = second.page.goto(link)
    assert answer is not None and answer.status == 404
    assert "has been used" in second.page.inner_text("#error-message")
    assert second.credentials() == []
    # Its registration route refuses too, even with the page's script bypassed.
    r = httpx.post(f"{link}/options", headers={"Origin": console.url, "Accept": "application/json"})
    assert r.status_code == 404 and r.json()["error"] == "invitation_not_valid"


def test_the_miner_sees_the_deposit_address_and_its_qr_code(console: Console) -> None:
    loan = console.world.funded_ready_loan()
    address = loan["collateral_address"]
    miner = console.enrol("miner")
    miner.page.goto(f"{console.url}/console/loans/{loan['id']}")
    assert miner.page.inner_text("#address-0") == address
    # What a phone's camera would read: the QR code as Chromium drew it, decoded from its
    # pixels by zxing-cpp (another implementation than segno's, which made it).
    png = miner.page.locator(".qr").first.screenshot()
    decoded = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))
    assert [(b.format, b.text) for b in decoded] == [(zxingcpp.BarcodeFormat.QRCode, address)]
    assert "pledge-hwi show-address" in miner.page.inner_text("#check-on-device")
    # The code is an image of its own, kept by the browser (an address at an index never
    # changes) but by no shared cache; an index never handed out has none.
    base = f"{console.url}/console/loans/{loan['id']}/addresses"
    qr = miner.page.request.get(f"{base}/0/qr.svg")
    assert qr.status == 200 and qr.headers["content-type"] == "image/svg+xml"
    assert qr.headers["cache-control"] == "private, max-age=86400, immutable"
    assert f"<title>{address}</title>" in qr.text()
    for index in ("7", "x", "99999999999999999999"):
        missing = miner.page.request.get(f"{base}/{index}/qr.svg")
        assert missing.status == 404, index
    with miner.page.expect_download() as download:
        miner.page.click("a[href$='/export/sparrow']")
    assert download.value.suggested_filename == f"loan-{loan['id']}-sparrow.txt"
    screenshot(miner.page, "loan-miner")


def test_a_miner_opening_another_miners_loan_gets_404(console: Console) -> None:
    theirs = console.world.funded_ready_loan()
    other = console.enrol("other_miner")
    answer = other.page.goto(f"{console.url}/console/loans/{theirs['id']}")
    assert answer is not None and answer.status == 404
    missing = other.page.goto(f"{console.url}/console/loans/999999")
    assert missing is not None and missing.status == 404
    assert other.page.inner_text("#error-message") == "loan not found"
    assert theirs["collateral_address"] not in other.page.content()
    # Nor its address's QR code: the image route asks the same question as the page.
    qr = other.page.request.get(f"{console.url}/console/loans/{theirs['id']}/addresses/0/qr.svg")
    assert qr.status == 404 and theirs["collateral_address"] not in qr.text()
    dashboard = other.page.goto(f"{console.url}/console/loans")
    assert dashboard is not None and dashboard.status == 200
    assert f"#{theirs['id']}" not in other.page.inner_text("#loans")


def _cookie(person: Person) -> str:
    return next(c["value"] for c in person.context.cookies() if c["name"] == "console_session")


def test_a_forged_cross_site_post_is_refused_and_changes_nothing(console: Console) -> None:
    operator = console.enrol("bank_operator")
    body = {
        "miner_party_id": str(console.world.party_ids["miner"]),
        "arbiter_party_id": str(console.world.party_ids["arbiter"]),
        "principal_rub": "1000000",
        "interest_rate_bps": "1800",
        "maturity_at": "2030-01-01T00:00:00+00:00",
        "required_collateral_sats": "50000000",
        "miner_return_address": MINER_RETURN,
        "bank_liquidation_address": BANK_LIQUIDATION,
    }
    before = _audit_count(console)
    # Another site's page posting a form to the console: its Origin is not ours (the
    # browser would not even send the SameSite=Strict cookie; the attack here has it).
    evil = new_person(console.browser, "attacker")
    evil.page.route(
        "http://evil.test/",
        lambda route: route.fulfill(
            content_type="text/html",
            body=f'<form id="f" method="post" action="{console.url}/console/loans">'
            + "".join(f'<input name="{k}" value="{v}">' for k, v in body.items())
            + "</form>",
        ),
    )
    evil.page.goto("http://evil.test/")
    with evil.page.expect_navigation():
        evil.page.eval_on_selector("#f", "f => f.submit()")
    assert "did not come from the console" in evil.page.content()
    cookie = {"console_session": _cookie(operator)}
    url = f"{console.url}/console/loans"
    foreign = httpx.post(url, data=body, cookies=cookie, headers={"Origin": "http://evil.test"})
    no_token = httpx.post(url, data=body, cookies=cookie, headers={"Origin": console.url})
    wrong = httpx.post(
        url, data={**body, "csrf": "0" * 64}, cookies=cookie, headers={"Origin": console.url}
    )
    for answer in (foreign, no_token, wrong):
        assert answer.status_code == 403, answer.text
        assert "Nothing was changed" in answer.text
    with Session(console.world.engine) as session:
        assert session.exec(select(Loan)).all() == []
    assert _audit_count(console) == before
    # The page's own form, with its token, goes through.
    operator.page.goto(url)
    for name, value in body.items():
        operator.page.fill(f"input[name={name}]", value)
    operator.page.click("#create-loan")
    operator.page.wait_for_url(re.compile(r".*/console/loans/\d+$"))
    with Session(console.world.engine) as session:
        assert len(session.exec(select(Loan)).all()) == 1
    screenshot(operator.page, "loan-staff")


def test_a_signed_out_session_cannot_act(console: Console) -> None:
    operator = console.enrol("bank_operator")
    operator.page.goto(f"{console.url}/console/loans")
    csrf = operator.page.get_attribute("input[name=csrf]", "value")
    cookie = {"console_session": _cookie(operator)}
    operator.page.click("#sign-out")
    operator.page.wait_for_url(f"{console.url}/console/sign-in")
    before = _audit_count(console)
    answer = httpx.post(
        f"{console.url}/console/prices",
        data={"csrf": csrf or "", "price_rub_per_btc": "7000000"},
        cookies=cookie,
        headers={"Origin": console.url},
    )
    assert answer.status_code == 401
    assert "sign in again" in answer.text
    page = httpx.get(f"{console.url}/console/loans", cookies=cookie)
    assert page.status_code == 401
    assert _audit_count(console) == before


def test_an_idle_session_expires(console: Console) -> None:
    auditor = console.enrol("auditor")
    idle = console.world.settings.console_idle_seconds
    with transaction(console.world.engine) as session:
        for row in session.exec(select(ConsoleSession)).all():
            row.last_seen_at = row.last_seen_at - timedelta(seconds=idle + 1)
            session.add(row)
    answer = auditor.page.goto(f"{console.url}/console/loans")
    assert answer is not None and answer.status == 401
    assert "without use" in auditor.page.inner_text("#error-message")
    with Session(console.world.engine) as session:
        assert session.exec(select(col(ConsoleSession.id))).all() == []


def test_an_auditor_reads_everything_and_changes_nothing(console: Console) -> None:
    loan = console.world.funded_ready_loan()
    auditor = console.enrol("auditor")
    auditor.page.goto(f"{console.url}/console/loans/{loan['id']}")
    assert auditor.page.inner_text("#address-0") == loan["collateral_address"]
    assert auditor.page.locator("main form").count() == 0  # only the header's sign-out
    csrf = auditor.page.get_attribute("input[name=csrf]", "value")
    before = _audit_count(console)
    for path, data in (
        (f"/console/loans/{loan['id']}/addresses", {}),
        ("/console/prices", {"price_rub_per_btc": "6000000"}),
    ):
        answer = httpx.post(
            f"{console.url}{path}",
            data={"csrf": csrf or "", **data},
            cookies={"console_session": _cookie(auditor)},
            headers={"Origin": console.url},
        )
        assert answer.status_code == 403, (path, answer.text)
    assert _audit_count(console) == before
    screenshot(auditor.page, "loan-auditor")
