"""The compliance officer's screening queue in a real browser: what waits, cleared with a
reason (audited, gone from the queue); an auditor reads it but has no buttons."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from sqlmodel import Session
from support.console import Console, screenshot

from custody.db.models import ScreeningDecision, ScreeningStatus
from custody.db.session import transaction


def _under_review(console: Console) -> int:
    """A payout address's screening the providers sent to review."""
    loan_id: int = console.world.funded_ready_loan()["id"]
    with transaction(console.world.engine) as session:
        row = ScreeningDecision(
            subject="payout",
            loan_id=loan_id,
            address="bcrt1qreviewme",
            purpose="miner_return",
            status=ScreeningStatus.review,
            result="review",
            score=60,
            reasons='["builtin: on the review list: exchange flagged"]',
        )
        session.add(row)
        session.flush()
        assert row.id is not None
        return row.id


def test_a_compliance_officer_clears_a_screening_from_the_queue(console: Console) -> None:
    decision_id = _under_review(console)
    auditor = console.enrol("auditor")
    auditor.page.goto(f"{console.url}/console/screening")
    row = auditor.page.locator(f"#queue tr[data-id='{decision_id}']")
    assert "exchange flagged" in row.inner_text()
    assert row.locator("button").count() == 0  # auditors read, never decide

    officer = console.enrol("compliance_officer")
    page = officer.page
    page.click("#nav-screening")
    page.wait_for_url(f"{console.url}/console/screening")
    row = page.locator(f"#queue tr[data-id='{decision_id}']")
    screenshot(page, "screening-queue")
    row.locator("input[name=reason]").fill("address belongs to the miner's licensed exchange")
    row.locator("button.clear").click()
    page.wait_for_url(f"{console.url}/console/screening")
    assert page.locator(f"#queue tr[data-id='{decision_id}']").count() == 0
    assert "licensed exchange" in page.inner_text("#resolved")
    with Session(console.world.engine) as s:
        stored = s.get(ScreeningDecision, decision_id)
        assert stored is not None and stored.status == ScreeningStatus.cleared
        assert stored.resolved_by == "compliance_officer:user-compliance_officer"

    # The export for the bank's filing downloads with the console's session (no API key).
    with page.expect_download() as download:
        page.click("#export")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text("utf-8"))))
    [exported] = [r for r in rows if r["address"] == "bcrt1qreviewme"]
    assert (exported["status"], exported["result"]) == ("cleared", "review")
    assert download.value.suggested_filename == "screening-decisions.csv"
    # A miner is refused the page's download as the API refuses it.
    miner = console.enrol("miner")
    r = miner.page.request.get(f"{console.url}/console/screening/decisions.csv")
    assert r.status == 403
