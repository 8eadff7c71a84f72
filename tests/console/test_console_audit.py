"""The console's audit log (filters, the chain's verification, which breaks when a row is
edited behind the service's back) and the dashboard's view of the service's own processes
(the watcher, the risk engine, the notifier), in a real browser."""

from __future__ import annotations

import html
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import Browser
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select
from support.console import Console, screenshot, served
from support.signer_world import free_port
from support.world import build_world

from custody.db.models import AuditEvent, SignerStatement
from custody.db.session import transaction
from custody.root import Root
from custody.workers.service import Heartbeat
from regtest.price_feed import PriceFeed, price_feed


def _count(console: Console, prefix: str) -> int:
    with Session(console.world.engine) as s:
        return int(
            s.exec(
                select(func.count())
                .select_from(AuditEvent)
                .where(col(AuditEvent.action).startswith(prefix))
            ).one()
        )


def test_the_audit_log_filters_verifies_and_shows_an_edit_behind_its_back(
    console: Console,
) -> None:
    console.world.funded_ready_loan()  # loans, keys, addresses: a log worth reading
    auditor = console.enrol("auditor")
    page = auditor.page
    answer = page.goto(f"{console.url}/console/audit")
    assert answer is not None and answer.status == 200
    assert "The hash chain verifies" in page.inner_text("#chain")
    shown = page.locator("#events tbody tr[data-event]").count()
    assert shown > 0

    prefix = "loan."
    page.fill("input[name=action]", prefix)
    page.click("#filters button[type=submit]")
    page.wait_for_url(f"{console.url}/console/audit?action=loan.*")
    actions = page.locator("#events td.action").all_inner_texts()
    assert actions and all(a.startswith(prefix) for a in actions)
    assert len(actions) == min(_count(console, prefix), 100)
    screenshot(page, "audit-log")

    # Someone with the database edits an event's reason: the page says where it broke.
    with Session(console.world.engine) as s:
        victim = s.exec(select(AuditEvent.id).order_by(col(AuditEvent.id))).first()
    assert victim is not None
    with transaction(console.world.engine) as s:
        s.execute(
            text("UPDATE auditevent SET reason = 'nothing to see' WHERE id = :id"), {"id": victim}
        )
    page.goto(f"{console.url}/console/audit")
    chain = page.inner_text("#chain")
    assert "broken" in chain and f"event {victim}" in chain


def test_only_staff_and_auditors_read_the_log_and_bad_filters_are_a_clear_4xx(
    console: Console,
) -> None:
    miner = console.enrol("miner")
    answer = miner.page.goto(f"{console.url}/console/audit")
    assert answer is not None and answer.status == 403
    assert "Audit log" not in miner.page.inner_text("header")
    status = miner.page.goto(f"{console.url}/console/status")
    assert status is not None and status.status == 403

    operator = console.enrol("bank_operator")
    bad = operator.page.goto(f"{console.url}/console/audit?loan=abc")
    assert bad is not None and bad.status == 422
    assert "loan must be a positive whole number" in operator.page.inner_text("#error-message")
    # An operator reads the log but is not shown the verification (the API's rule).
    operator.page.goto(f"{console.url}/console/audit")
    assert "shown to approvers, auditors and the admin" in operator.page.inner_text("#chain")


def test_the_dashboard_follows_the_services_processes_without_reload(console: Console) -> None:
    operator = console.enrol("bank_operator")
    page = operator.page
    page.goto(f"{console.url}/console/loans")
    assert "not started yet" in page.inner_text("#status-watcher")
    assert "not running" in page.inner_text("#status-risk")

    risk = Heartbeat(console.world.engine, "risk")
    risk.start()
    risk.beat()
    risk.beat(RuntimeError("every price source is away"))
    page.wait_for_selector("#status-risk:has-text('running, 2 passes')", timeout=15_000)
    assert "every price source is away" in page.inner_text("#status-risk")
    screenshot(page, "dashboard-status")

    risk.stop()  # a clean stop: the engine is no longer listed
    page.wait_for_selector("#status-risk:has-text('not running')", timeout=15_000)


@pytest.fixture
def fed_console(
    console_engine: Engine, console_browser: Browser
) -> Iterator[tuple[Console, PriceFeed]]:
    """The console with one HTTP price source (a local feed the test moves)."""
    with price_feed("6000000") as feed:
        port = free_port()
        world = build_world(
            console_engine,
            console_origin=f"http://localhost:{port}",
            price_sources=[feed.source_config()],
        )
        app = Root.assemble(world.settings, engine=console_engine).app()
        with served(app, port) as url:
            yield Console(world=world, url=url, browser=console_browser), feed


def test_the_price_desk_shows_each_feed_and_why_one_is_left_out(
    fed_console: tuple[Console, PriceFeed],
) -> None:
    console, feed = fed_console
    operator = console.enrol("bank_operator")
    page = operator.page
    page.goto(f"{console.url}/console/prices")
    assert "Their median now: 6000000 RUB/BTC" in page.inner_text("#feeds-median")
    assert page.locator("#feeds li.feed-ok").count() == 1
    screenshot(page, "price-desk")

    feed.set("6000000", datetime.now(UTC) - timedelta(hours=2))  # the feed goes stale
    page.goto(f"{console.url}/console/prices")
    assert "No usable median" in page.inner_text("#feeds-median")
    (failure,) = page.locator("#feeds li.feed-failed").all_inner_texts()
    assert failure.startswith("feed:") and "old" in failure, failure


def test_an_operator_asks_the_banks_signer_for_the_bank_key_from_the_loan_page(
    console: Console,
) -> None:
    world = console.world
    loan_id = world.create_loan()["id"]
    for seat in ("miner", "arbiter"):
        assert world.register(loan_id, seat).status_code == 200
    miner = console.enrol("miner")
    miner.page.goto(f"{console.url}/console/loans/{loan_id}")
    assert miner.page.locator("#bank-key-from-signer").count() == 0  # not the miner's seat

    operator = console.enrol("bank_operator")
    page = operator.page
    page.goto(f"{console.url}/console/loans/{loan_id}")
    page.select_option("#bank-key-from-signer select[name=kind]", "hd")
    page.click("#bank-key-from-signer button[type=submit]")
    page.wait_for_selector("#bank-key-statement")
    shown = page.inner_text("#bank-key-statement")
    statement_id = int(shown.split("statement\n")[-1].split("#", 1)[1].split()[0])
    api = world.call("bank_operator", "GET", f"/v1/signer-statements/{statement_id}").json()
    assert api["kind"] == "register_loan" and api["loan_id"] == loan_id
    assert api["statement"]["bank_key"] == "hd"
    assert api["digest"] in shown and "nobody" in shown
    assert page.locator("#bank-key-from-signer").count() == 0  # one request at a time

    # A forged kind is a clear 4xx and opens nothing more.
    csrf = page.get_attribute("input[name=csrf]", "value")
    answer = page.request.post(
        f"{console.url}/console/loans/{loan_id}/keys/bank/signer",
        form={"csrf": csrf or "", "kind": "mine"},
        headers={"Origin": console.url},
    )
    assert answer.status == 422 and "either 'hd' or 'fixed'" in html.unescape(answer.text())
    with Session(world.engine) as s:
        opened = s.exec(select(func.count()).select_from(SignerStatement)).one()
    assert opened == 1
