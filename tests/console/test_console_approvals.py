"""Passkey approvals in the console, in Chromium with a virtual authenticator, checked by
the bank's real signer (in process, a SoftHSM2 token) against the passkey two signer admins
enrolled: the passkey the approver registered for the console's sign-in, enrolled from the
admin's dashboard. A release so approved is signed by the miner through the console,
broadcast and mined on btcd; an approval captured on one request's page is refused on
another's, and nothing is endorsed."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Route, expect
from sqlmodel import Session
from support.console import Console, Person, screenshot
from support.lending import funded_loan, request, sign
from support.signer_world import SignerWorld

from custody.config import Settings
from custody.db.models import Loan
from custody.root import Root
from custody.signing import repository as signing_repository
from custody.watcher.service import Watcher
from pledge.amounts import kopecks_for_sats
from regtest.node import RegtestNode
from regtest.wait import wait_until


@pytest.fixture
def approvals_watcher(signer_console: Console, regtest_node: RegtestNode) -> Iterator[Watcher]:
    settings = Settings(
        network="regtest", watch_start_height=regtest_node.rpc.get_block_count() + 1
    )
    w = Root.assemble(settings, engine=signer_console.world.engine, node=regtest_node.rpc).watcher()
    w.acquire()
    yield w
    w.release()


def _cookie(person: Person) -> str:
    return str(next(c["value"] for c in person.context.cookies() if c["name"] == "console_session"))


def _principal_id(console: Console, who: str) -> int:
    return int(console.world.call(who, "GET", "/v1/me").json()["id"])


def _approval(console: Console, rid: int) -> dict[str, Any]:
    r = console.world.call("bank_operator", "GET", f"/v1/signing-requests/{rid}/approval")
    assert r.status_code == 200, r.text
    view: dict[str, Any] = r.json()
    return view


def enrol_approver(console: Console) -> tuple[Person, str]:
    """The approver registers a console passkey; an admin opens its enrolment with the
    bank's signer from the dashboard; two signer admins sign it. (person, signer name)"""
    approver = console.enrol("bank_approver")
    admin = console.enrol("admin")
    admin.page.goto(f"{console.url}/console/loans")
    admin.page.click(f"#enrol-{_principal_id(console, 'bank_approver')}")
    statement_id = int(admin.page.inner_text("#statement-id"))
    view = console.world.call("admin", "GET", f"/v1/signer-statements/{statement_id}").json()
    statement = view["statement"]
    (credential,) = approver.credentials()
    assert statement["kind"] == "enroll" and statement["algorithm"] == "webauthn"
    assert statement["rp_id"] == "localhost" and statement["origins"] == [console.url]
    assert base64.urlsafe_b64decode(statement["credential_id"] + "==") == base64.b64decode(
        credential["credentialId"]
    )
    done = console.world.sign_statement(statement_id, "admin1", "admin2", submitter="admin")
    assert done.json()["state"] == "done", done.text
    return approver, str(statement["name"])


def _operator_endorses(console: Console, rid: int) -> None:
    """The bank's operator signs the request's statement with their own key (the API)."""
    view = _approval(console, rid)
    body = console.world.staff["operator"].endorse(view["statement"])
    r = console.world.call("bank_operator", "POST", view["endorse_at"], json=body)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "open"


def _confirm_price(console: Console, price: str) -> None:
    """A BTC/RUB price proposed by the operator and confirmed by the approver (the API)."""
    r = console.world.call("bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": price})
    assert r.status_code == 201, r.text
    done = console.world.call("bank_approver", "POST", f"/v1/prices/{r.json()['id']}/confirm")
    assert done.status_code == 200, done.text


def _state(console: Console, loan_id: int) -> str:
    with Session(console.world.engine) as session:
        loan = session.get(Loan, loan_id)
        assert loan is not None
        return str(loan.state)


def test_an_approver_approves_a_release_with_their_passkey_and_it_is_mined(
    signer_console: Console,
    regtest_node: RegtestNode,
    approvals_watcher: Watcher,
    bank_signer: SignerWorld,
    tmp_path: Path,
) -> None:
    console = signer_console
    funded = funded_loan(console.world, regtest_node, approvals_watcher)
    lid = funded.loan["id"]
    rid = int(request(console.world, "bank_operator", lid, action="release")["id"])
    approver, person = enrol_approver(console)
    _operator_endorses(console, rid)

    _confirm_price(console, "8000000")

    page = approver.page
    page.goto(f"{console.url}/console/loans")  # the approver finds it on the first page
    assert "Waiting for the bank's approval" in page.inner_text("#waiting")
    page.click(f"#waiting a[href='/console/requests/{rid}']")
    page.wait_for_url(f"{console.url}/console/requests/{rid}")
    outputs = page.inner_text("#approval-outputs")
    (out,) = console.world.call("miner", "GET", f"/v1/signing-requests/{rid}").json()["outputs"]
    assert "the miner's return address" in outputs
    assert funded.loan["terms"]["miner_return_address"] in outputs
    rub = kopecks_for_sats(int(out["amount_sats"]), Decimal("8000000"))
    assert f"{out['amount_sats'] / 100_000_000:.8f}" in outputs
    assert f"{rub / 100:,.2f}".replace(",", " ") + " RUB" in outputs
    fee = page.inner_text("#approval-fee")
    assert "sat/vB" in fee and "RUB" in fee
    ltv = page.inner_text("#approval-ltv")
    assert "LTV before: " in ltv and "%" in ltv and "no collateral left" in ltv
    assert page.inner_text("#approval-digest") == _digest(console, rid)
    screenshot(page, "approval")
    before = bank_signer.bank_signatures()
    page.click("#approve")
    expect(page.locator("#status")).to_contain_text("done", timeout=30_000)
    screenshot(page, "approval-done")
    # the bank's signer checked the passkey's assertion and signed with the bank's key
    assert bank_signer.bank_signatures() == before + 1
    signed = console.world.call("miner", "GET", f"/v1/signing-requests/{rid}").json()
    assert "bank" in signed["signed_seats"], signed
    page.goto(f"{console.url}/console/loans")
    assert page.locator(f"#waiting a[href='/console/requests/{rid}']").count() == 0
    statement = console.world.call("admin", "GET", f"/v1/signer-statements/{_sid(console, rid)}")
    assert statement.json()["outcome"].endswith(f"approved by {person}"), statement.text

    # the miner signs the .psbt on their device and uploads it: broadcast at quorum
    miner = console.enrol("miner")
    miner.page.goto(f"{console.url}/console/requests/{rid}")
    assert miner.page.locator("#approve").count() == 0  # the miner approves nothing
    asked = httpx.get(
        f"{console.url}/console/requests/{rid}/approval",
        cookies={"console_session": _cookie(miner)},
        headers={"Accept": "application/json"},
    )
    assert asked.status_code == 403 and asked.json()["error"] == "role_not_allowed", asked.text
    with miner.page.expect_download() as download:
        miner.page.click("#psbt-file")
    unsigned = Path(download.value.path()).read_bytes()
    signed_file = tmp_path / "signed.psbt"
    signed_file.write_bytes(
        base64.b64decode(sign(base64.b64encode(unsigned).decode(), funded.roots["miner"]))
    )
    miner.page.set_input_files("#psbt-upload", str(signed_file))
    miner.page.click("#upload-submit")
    miner.page.wait_for_url(f"{console.url}/console/requests/{rid}")
    assert miner.page.inner_text("#req-state") == "broadcast"
    txid = console.world.call("miner", "GET", f"/v1/signing-requests/{rid}").json()
    assert txid["unsigned_txid"] in regtest_node.rpc.get_raw_mempool()
    regtest_node.mine(1)
    wait_until(
        lambda: approvals_watcher.step() is not None and _state(console, lid) == "released",
        timeout=60,
        interval=0.2,
    )
    miner.page.goto(f"{console.url}/console/loans/{lid}")
    assert miner.page.inner_text("#loan-state") == "released"


def _sid(console: Console, rid: int) -> int:
    with Session(console.world.engine) as session:
        st = signing_repository.transaction_statement_of(session, rid)
        assert st is not None and st.id is not None
        return st.id


def _digest(console: Console, rid: int) -> str:
    view = console.world.call("admin", "GET", f"/v1/signer-statements/{_sid(console, rid)}")
    return str(view.json()["digest"])


def test_an_approval_captured_for_one_request_does_not_approve_another(
    signer_console: Console,
    regtest_node: RegtestNode,
    approvals_watcher: Watcher,
    bank_signer: SignerWorld,
) -> None:
    console = signer_console
    first = funded_loan(console.world, regtest_node, approvals_watcher)
    second = funded_loan(console.world, regtest_node, approvals_watcher)
    a = int(request(console.world, "bank_operator", first.loan["id"], action="release")["id"])
    b = int(request(console.world, "bank_operator", second.loan["id"], action="release")["id"])
    approver, person = enrol_approver(console)
    page = approver.page

    def hold(route: Route) -> None:
        """The assertion made on A's page is kept here, not sent."""
        if route.request.method == "POST":
            route.abort()
        else:
            route.continue_()

    approval_a = f"{console.url}/console/requests/{a}/approval"
    page.route(approval_a, hold)
    page.goto(f"{console.url}/console/requests/{a}")
    with page.expect_request(lambda r: r.method == "POST" and r.url == approval_a) as made:
        page.click("#approve")
    captured = [made.value.post_data or ""]
    expect(page.locator("#status")).to_contain_text("Refused")  # held: it never left
    assertion = json.loads(captured[0])
    assert assertion["id"] in {c["credential_id"] for c in _approval(console, a)["credentials"]}

    page.unroute(approval_a)
    page.goto(f"{console.url}/console/requests/{b}")
    csrf = page.get_attribute("#approve", "data-csrf") or ""
    before = bank_signer.bank_signatures()

    def post_to_b(**headers: str) -> httpx.Response:
        return httpx.post(
            f"{console.url}/console/requests/{b}/approval",
            content=captured[0],
            cookies={"console_session": _cookie(approver)},
            headers={"Content-Type": "application/json", "Accept": "application/json", **headers},
        )

    # without the session's CSRF token, or from another origin: refused before it is read
    forged = post_to_b(Origin=console.url)
    assert forged.status_code == 403 and forged.json()["error"] == "forged_request", forged.text
    foreign = post_to_b(Origin="http://evil.localhost", **{"X-CSRF-Token": csrf})
    assert foreign.status_code == 403 and foreign.json()["error"] == "forged_request"
    refused = httpx.post(
        f"{console.url}/console/requests/{b}/approval",
        content=captured[0],
        cookies={"console_session": _cookie(approver)},
        headers={
            "Origin": console.url,
            "X-CSRF-Token": csrf,
            "Content-Type": "application/json",
            "Accept": "application/json",
        },
    )
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == "passkey_not_verified"
    assert "another statement" in refused.json()["message"]
    # nothing endorsed: B (and A) still need the approver's approval, nothing was signed
    assert _approval(console, b)["signed_by"] == []
    assert _approval(console, a)["signed_by"] == []
    assert person in {c["person"] for c in _approval(console, b)["credentials"]}
    assert bank_signer.bank_signatures() == before
    assert console.world.call("miner", "GET", f"/v1/signing-requests/{b}").json()["state"] == (
        "awaiting_signatures"
    )
    # only an admin opens an enrolment with the signer (the approver cannot enrol themself)
    self_enrol = httpx.post(
        f"{console.url}/console/principals/{_principal_id(console, 'bank_approver')}"
        "/signer-enrolment",
        data={"csrf": csrf},
        cookies={"console_session": _cookie(approver)},
        headers={"Origin": console.url, "Accept": "application/json"},
    )
    assert self_enrol.status_code == 403, self_enrol.text
    assert self_enrol.json()["error"] == "role_not_allowed"
    # B's own approval, made on B's page, is kept
    page.click("#approve")
    expect(page.locator("#status")).to_contain_text(f"Approved by {person}", timeout=30_000)
    assert _approval(console, b)["signed_by"] == [person]
    screenshot(page, "approval-second-request")
