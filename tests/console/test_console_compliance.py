"""The compliance officer's console: the dashboard lists the miners' records waiting for a
review, the record page shows the data, flags and evidence, and Approve is what lets the
miner's draft loan leave `draft`. Through a real browser, as the other console tests."""

from __future__ import annotations

from playwright.sync_api import FilePayload
from support.console import Console, screenshot
from support.kyc import CLEAN_RECORD
from support.world import hd_key


def test_a_compliance_officer_approves_a_record_and_the_loan_leaves_draft(
    console: Console,
) -> None:
    world = console.world
    party = world.call(
        "admin", "POST", "/v1/parties", json={"name": "Kuzbass Hash LLC", "kind": "miner"}
    )
    assert party.status_code == 201, party.text
    party_id = party.json()["id"]
    r = world.call(
        "admin",
        "POST",
        "/v1/principals",
        json={"name": "kuzbass", "role": "miner", "party_id": party_id},
    )
    world.api_keys["kuzbass"] = r.json()["api_key"]
    # A company above the data-centre threshold with none on record: high-risk.
    big = {**CLEAN_RECORD, "monthly_energy_kwh": 400_000}
    r = world.call("bank_operator", "PUT", f"/v1/parties/{party_id}/miner-record", json=big)
    assert r.status_code == 200 and r.json()["approvals_needed"] == 2, r.text
    body = world.loan_body()
    body["miner_party_id"] = party_id
    loan = world.call("bank_operator", "POST", "/v1/loans", json=body).json()["id"]
    for who, seat in (("kuzbass", "miner"), ("arbiter", "arbiter")):
        key = {"kind": "hd", "key": hd_key()}
        assert world.call(who, "PUT", f"/v1/loans/{loan}/keys/{seat}", json=key).status_code == 200

    officer = console.enrol("compliance_officer")
    page = officer.page
    queue = page.locator("#compliance .to-review", has_text="Kuzbass Hash LLC")
    assert "no_data_centre_for_high_energy" in queue.inner_text()
    queue.locator("a").click()
    page.wait_for_url(f"{console.url}/console/parties/{party_id}/miner-record")
    assert page.inner_text("#record-state").startswith("Compliance: pending")
    assert page.inner_text("#inn") == CLEAN_RECORD["inn"]
    assert "400000 kWh a month" in page.inner_text("#flags")
    page.fill("#review input[name=reason]", "register extract and energy contract checked")
    with page.expect_navigation():
        page.click("#approve-record")
    assert "approve" in page.inner_text("#reviews")
    assert page.locator("#approve-record").count() == 0  # the same officer cannot approve twice
    screenshot(page, "miner-record-compliance")
    # One approval of a high-risk record: the loan is still held in draft.
    held = world.call(
        "bank_operator", "PUT", f"/v1/loans/{loan}/keys/bank", json={"kind": "hd", "key": hd_key()}
    )
    assert held.status_code == 409 and held.json()["error"] == "compliance_pending", held.text
    # The second, different officer approves through the API: the loan leaves draft.
    digest = world.call("admin", "GET", f"/v1/parties/{party_id}/miner-record").json()["digest"]
    r = world.call(
        "admin",
        "POST",
        "/v1/principals",
        json={
            "name": "second-officer",
            "role": "compliance_officer",
            "party_id": world.party_ids["bank"],
        },
    )
    world.api_keys["second-officer"] = r.json()["api_key"]
    r = world.call(
        "second-officer",
        "POST",
        f"/v1/parties/{party_id}/miner-record/reviews",
        json={"decision": "approve", "reason": "second pair of eyes", "digest": digest},
    )
    assert r.status_code == 201 and r.json()["state"] == "approved", r.text
    done = world.call(
        "bank_operator", "PUT", f"/v1/loans/{loan}/keys/bank", json={"kind": "hd", "key": hd_key()}
    )
    assert done.status_code == 200 and done.json()["state"] == "awaiting_deposit", done.text
    page.reload()
    assert page.inner_text("#record-state").startswith("Compliance: approved")
    # The dashboard's queue no longer lists it.
    page.goto(f"{console.url}/console/loans")
    assert page.locator("#compliance .to-review", has_text="Kuzbass Hash LLC").count() == 0


def test_the_bank_operator_edits_and_the_miner_uploads_through_the_console(
    console: Console,
) -> None:
    world = console.world
    party_id = world.party_ids["other_miner"]
    operator = console.enrol("bank_operator")
    page = operator.page
    page.goto(f"{console.url}/console/parties/{party_id}/miner-record")
    assert page.locator("#approve-record").count() == 0  # an operator does not review
    page.fill("#edit input[name=inn]", "7707083894")  # a wrong check digit
    with page.expect_navigation():
        page.click("#save-record")
    assert "check digits" in page.inner_text("main")
    page.goto(f"{console.url}/console/parties/{party_id}/miner-record")
    page.fill("#edit input[name=monthly_energy_kwh]", "70000")
    with page.expect_navigation():
        page.click("#save-record")
    assert page.inner_text("#record-state").startswith("Compliance: pending")
    assert "70000 kWh" in page.inner_text("#record")
    miner = console.enrol("other_miner")
    miner.page.goto(f"{console.url}/console/parties/{party_id}/miner-record")
    assert miner.page.locator("#edit").count() == 0
    miner.page.set_input_files(
        "#documents input[type=file]",
        files=FilePayload(name="extract.pdf", mimeType="application/pdf", buffer=b"%PDF-1.4 x"),
    )
    with miner.page.expect_navigation():
        miner.page.click("#upload")
    assert "extract.pdf" in miner.page.inner_text("#documents")
    docs = world.call("other_miner", "GET", f"/v1/parties/{party_id}/documents").json()
    assert [d["filename"] for d in docs] == ["extract.pdf"]
    # Another miner's record is not found for this miner.
    other = miner.page.goto(
        f"{console.url}/console/parties/{world.party_ids['miner']}/miner-record"
    )
    assert other is not None and other.status == 404
