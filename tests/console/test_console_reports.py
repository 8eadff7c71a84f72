"""The console's reports in a real browser: a compliance officer downloads the collateral
register at a date (CSV and XLSX) from the Reports page, and a loan's statement from its
page; a miner has neither the page nor the downloads."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from openpyxl import load_workbook
from pypdf import PdfReader
from support.console import Console, screenshot
from support.lending import funded_loan

from custody.config import Settings
from custody.root import Root
from custody.watcher.service import Watcher
from regtest.node import RegtestNode


@pytest.fixture
def console_watcher(node_console: Console, regtest_node: RegtestNode) -> Iterator[Watcher]:
    settings = Settings(
        network="regtest", watch_start_height=regtest_node.rpc.get_block_count() + 1
    )
    w = Root.assemble(settings, engine=node_console.world.engine, node=regtest_node.rpc).watcher()
    w.acquire()
    yield w
    w.release()


def test_a_compliance_officer_downloads_the_register_and_a_statement(
    node_console: Console, regtest_node: RegtestNode, console_watcher: Watcher
) -> None:
    console = node_console
    funded = funded_loan(console.world, regtest_node, console_watcher, hsm_bank=False)
    lid = funded.loan["id"]
    officer = console.enrol("compliance_officer")
    page = officer.page
    page.click("#nav-reports")
    page.wait_for_url(f"{console.url}/console/reports")

    with page.expect_download() as download:
        page.click("#register-csv")  # no date: now
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text("utf-8"))))
    [row, total] = rows
    assert row["loan_id"] == str(lid) and row["outpoint"] == "{}:{}".format(*funded.deposit)
    assert row["amount_sats"] == total["amount_sats"] == "50000000"
    assert download.value.suggested_filename.endswith(".csv")

    page.fill("input[name=at]", "2020-01-01T00:00:00")  # before any of it: nothing held
    with page.expect_download() as download:
        page.click("#register-xlsx")
    book = load_workbook(io.BytesIO(Path(download.value.path()).read_bytes()))
    params = {name: value for name, value in book["Parameters"].iter_rows(values_only=True)}
    assert str(params["at (UTC)"]).startswith("2020-01-01 00:00:00")
    assert params["outpoints"] == 0
    screenshot(page, "reports")

    page.goto(f"{console.url}/console/loans/{lid}")
    with page.expect_download() as download:
        page.click("#statement a")
    assert download.value.suggested_filename == f"loan-{lid}-statement.pdf"
    text = " ".join(p.extract_text() for p in PdfReader(download.value.path()).pages)
    assert f"Loan {lid}: statement" in text and funded.deposit[0] in " ".join(text.split())


def test_a_miner_has_no_reports(node_console: Console) -> None:
    lid = node_console.world.funded_ready_loan()["id"]
    miner = node_console.enrol("miner")
    assert miner.page.locator("#nav-reports").count() == 0
    for path in (
        "/console/reports",
        "/console/reports/collateral-register.csv",
        f"/console/loans/{lid}/statement.pdf",
    ):
        answer = miner.page.request.get(f"{node_console.url}{path}")
        assert answer.status == 403, path
    miner.page.goto(f"{node_console.url}/console/loans/{lid}")
    assert miner.page.locator("#statement").count() == 0
