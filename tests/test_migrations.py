"""The Alembic migrations build exactly the schema the models describe, on both databases.

Other tests get copies of a database migrated once per session (tests/conftest.py); here
the migrations run for real, on an empty database, and the copies are shown to be apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel
from support.databases import copy_sqlite

from custody.db.migrate import current_revision, head_revision, upgrade
from custody.db.session import make_engine
from regtest.postgres import PostgresServer


@pytest.fixture(params=["sqlite", "postgres"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database (no schema, no Alembic version table) on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    eng = make_engine(url)
    yield eng
    eng.dispose()


def test_migrations_match_the_models(empty_engine: Engine) -> None:
    assert current_revision(empty_engine) is None
    upgrade(empty_engine)
    assert current_revision(empty_engine) == head_revision()
    with empty_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"


def test_the_engine_fixture_is_migrated(engine: Engine) -> None:
    assert current_revision(engine) == head_revision()


def _revision_rows(url: str) -> int:
    eng = make_engine(url)
    try:
        with eng.connect() as conn:
            count: int = conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one()
            return count
    finally:
        eng.dispose()


def _forget_the_revision(url: str) -> None:
    eng = make_engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(text("DELETE FROM alembic_version"))
    finally:
        eng.dispose()


def test_sqlite_copies_of_the_template_are_apart(sqlite_template: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    copy_sqlite(sqlite_template, first)
    copy_sqlite(sqlite_template, second)
    _forget_the_revision(f"sqlite:///{first}")
    assert _revision_rows(f"sqlite:///{first}") == 0
    assert _revision_rows(f"sqlite:///{second}") == 1
    assert _revision_rows(f"sqlite:///{sqlite_template}") == 1


def test_postgres_copies_of_the_template_are_apart(
    postgres_database: Callable[..., str], postgres_server: PostgresServer, postgres_template: str
) -> None:
    first = postgres_database(template=postgres_template)
    second = postgres_database(template=postgres_template)
    _forget_the_revision(first)
    assert _revision_rows(first) == 0
    assert _revision_rows(second) == 1
    assert _revision_rows(postgres_server.url(postgres_template)) == 1


def test_0008_numbers_each_loans_history_and_keeps_the_outbox(empty_engine: Engine) -> None:
    """Loans that already moved get the number of their state changes so far (the next
    change's webhook id must not repeat an old one); queued events stay queued, and an
    event id may now repeat across webhooks but not within one."""
    upgrade(empty_engine, "0007")
    now = datetime.now(UTC)
    rows: list[tuple[str, dict[str, Any]]] = []
    for pid, kind in ((1, "miner"), (2, "bank"), (3, "arbiter")):
        rows.append(
            (
                "INSERT INTO party (id, name, kind, created_at) VALUES (:id, :name, :kind, :t)",
                {"id": pid, "name": f"p{pid}", "kind": kind, "t": now},
            )
        )
    rows.append(
        (
            "INSERT INTO principal (id, name, role, key_hash, key_prefix, disabled, created_at)"
            " VALUES (1, 'u', 'admin', :h, 'pc_', :no, :t)",
            {"h": "h" * 64, "no": False, "t": now},
        )
    )
    for loan_id, state in ((1, "active"), (2, "draft")):
        rows.append(
            (
                "INSERT INTO loan (id, state, miner_party_id, bank_party_id, arbiter_party_id,"
                " principal_kopecks, interest_rate_bps, maturity_at, required_collateral_sats,"
                " margin_call_ltv_bps, liquidation_ltv_bps, cure_window_hours,"
                " miner_return_address, bank_liquidation_address, next_address_index,"
                " credited_kopecks, created_by, created_at, updated_at) VALUES (:id, :state,"
                " 1, 2, 3, 100, 100, :t, 1000, 7500, 9000, 48, 'a', 'b', 0, 0, 1, :t, :t)",
                {"id": loan_id, "state": state, "t": now},
            )
        )
    for event, action in (
        (1, "loan.state_changed"),
        (2, "deposit.seen"),
        (3, "loan.state_changed"),
    ):
        rows.append(
            (
                "INSERT INTO auditevent (id, at, actor, action, loan_id, data, prev_hash, hash)"
                " VALUES (:id, :t, 'test', :action, 1, '{}', :prev, :hash)",
                {
                    "id": event,
                    "t": now,
                    "action": action,
                    "prev": "0" * 64,
                    "hash": str(event) * 64,
                },
            )
        )
    for hook, party in ((1, 2), (2, 1)):
        rows.append(
            (
                "INSERT INTO webhook (id, party_id, url, secret, events, active, created_at)"
                " VALUES (:id, :party, 'https://example.com/h', :secret, '*', :yes, :t)",
                {"id": hook, "party": party, "secret": "s" * 40, "yes": True, "t": now},
            )
        )
    outbox = (
        "INSERT INTO outbox (event_id, webhook_id, event_type, payload, created_at, attempts,"
        " next_attempt_at) VALUES ('e1', :hook, 'deposit.seen', '{}', :t, 0, :t)"
    )
    rows.append((outbox, {"hook": 1, "t": now}))
    with empty_engine.begin() as conn:
        for sql, params in rows:
            conn.execute(text(sql), params)

    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        versions: dict[int, int] = dict(
            conn.execute(text("SELECT id, state_version FROM loan")).all()
        )
        assert versions == {1: 2, 2: 0}
        assert conn.execute(text("SELECT event_id, webhook_id FROM outbox")).all() == [("e1", 1)]
        conn.execute(text(outbox), {"hook": 2, "t": now})  # the same event, another webhook
    with pytest.raises(IntegrityError), empty_engine.begin() as conn:
        conn.execute(text(outbox), {"hook": 1, "t": now})
