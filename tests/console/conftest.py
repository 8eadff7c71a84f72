"""Fixtures of the console's browser tests. `console_browser` is a real part (the marker
`browser`, tests/conftest.py): `-m unit` leaves these tests out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright
from sqlalchemy.engine import Engine
from support.console import CHROMIUM, CHROMIUM_ARGS, Console, served
from support.databases import copy_sqlite
from support.signer_fixtures import bank_signer, feed
from support.signer_world import SignerWorld, free_port
from support.world import build_world

from custody.db.session import make_engine
from custody.root import Root
from regtest.node import RegtestNode

__all__ = ["bank_signer", "feed"]  # the bank's signer (in process, SoftHSM2) for approvals


@pytest.fixture(scope="session")
def console_browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, one per test process."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def console_engine(sqlite_template: Path, tmp_path: Path) -> Iterator[Engine]:
    """The console runs on SQLite, as `make up` does: a migrated file of this test's own."""
    path = tmp_path / "console.db"
    copy_sqlite(sqlite_template, path)
    engine = make_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


def _console(
    engine: Engine, browser: Browser, node: RegtestNode | None, signer: SignerWorld | None = None
) -> Iterator[Console]:
    port = free_port()
    origin = f"http://localhost:{port}"
    client = signer.client if signer else None
    world = build_world(
        engine,
        chain=node.rpc if node else None,
        signer=client,
        staff=signer.staff if signer else None,
        console_origin=origin,
    )
    app = Root.assemble(
        world.settings, engine=engine, node=node.rpc if node else None, signer=client
    ).app()
    with served(app, port) as url:
        yield Console(world=world, url=url, browser=browser)


@pytest.fixture
def console(console_engine: Engine, console_browser: Browser) -> Iterator[Console]:
    """The service on SQLite behind uvicorn, with no node (pages that need none)."""
    yield from _console(console_engine, console_browser, None)


@pytest.fixture
def node_console(
    console_engine: Engine, console_browser: Browser, regtest_node: RegtestNode
) -> Iterator[Console]:
    """The same with the regtest node: deposits, confirmations."""
    yield from _console(console_engine, console_browser, regtest_node)


@pytest.fixture
def signer_console(
    console_engine: Engine,
    console_browser: Browser,
    regtest_node: RegtestNode,
    bank_signer: SignerWorld,
) -> Iterator[Console]:
    """The same with the bank's signer (a real SoftHSM2 token): passkey approvals."""
    yield from _console(console_engine, console_browser, regtest_node, bank_signer)
