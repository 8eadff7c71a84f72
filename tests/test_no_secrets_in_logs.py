"""No secret in any log line: a failed INSERT of a webhook once wrote its HMAC secret to
stderr (SQLAlchemy's error text lists the bound parameters; the app logs it with the
traceback, and so does uvicorn).

The failure is forced below the request's validation (a trigger in the test's database
refuses every webhook INSERT), so it survives any stricter input checks; the server is a
real `custody serve` process whose whole output is captured and searched for the
secrets the test used: the webhook's secret and the caller's API key."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from support.custody_serve import custody_serve

from custody.auth.service import create_principal
from custody.db.models import Party, PartyKind, Role
from custody.db.session import transaction
from regtest.wait import wait_until

pytestmark = [pytest.mark.process]  # starts custody serve and python processes

WEBHOOK_SECRET = "hmac-secret-that-must-never-be-logged-0123456789"
REFUSAL = "refused by the test trigger"

_SQLITE_TRIGGER = f"""
CREATE TRIGGER refuse_webhooks BEFORE INSERT ON webhook
BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END
"""
_POSTGRES_TRIGGER = [
    f"""CREATE FUNCTION refuse_webhooks() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION '{REFUSAL}'; END $$""",
    """CREATE TRIGGER refuse_webhooks BEFORE INSERT ON webhook
    FOR EACH ROW EXECUTE FUNCTION refuse_webhooks()""",
]


def _refuse_webhook_inserts(engine: Engine) -> None:
    with engine.begin() as conn:
        statements = _POSTGRES_TRIGGER if engine.dialect.name == "postgresql" else [_SQLITE_TRIGGER]
        for statement in statements:
            conn.execute(text(statement))


def test_a_failed_webhook_insert_logs_the_failure_but_no_secret(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    _refuse_webhook_inserts(engine)
    with transaction(engine) as s:
        party = Party(name="leaky-miner", kind=PartyKind.miner)
        s.add(party)
        s.flush()
        assert party.id is not None
        party_id = party.id
        _, api_key = create_principal(
            s, name="leaky-miner-user", role=Role.miner, party_id=party_id, actor="test"
        )

    with custody_serve(db_url, tmp_path, api_access_log="true") as server:
        r = httpx.post(
            f"{server.url}/v1/parties/{party_id}/webhooks",
            json={"url": "http://127.0.0.1:9/hook", "secret": WEBHOOK_SECRET, "events": "*"},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=30,
        )
        assert r.status_code == 500, r.text
        assert r.json() == {"error": "internal_error", "message": "internal error", "field": None}
        assert WEBHOOK_SECRET not in r.text
        # The failure is logged (by the app, with its traceback): wait for it.
        wait_until(lambda: REFUSAL in server.log(), timeout=30, message=server.log)
    log = server.log()  # the process has exited: everything it wrote is there
    assert "api.unhandled_error" in log and "Traceback" in log
    lines = log.splitlines()
    assert not [line for line in lines if WEBHOOK_SECRET in line], log
    assert not [line for line in lines if api_key in line], log
    assert not [line for line in lines if api_key[3:] in line], log  # without the prefix


_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    import structlog
    from sqlalchemy import create_engine, text
    from custody.logging import configure_logging

    configure_logging()
    secret, key = sys.argv[1], sys.argv[2]
    # An engine that does show bound parameters: the logging layer must hide them itself.
    engine = create_engine("sqlite://")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE hook (secret TEXT UNIQUE)"))
        conn.execute(text("INSERT INTO hook VALUES (:s)"), {"s": secret})
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO hook VALUES (:s)"), {"s": secret})
    except Exception as exc:
        structlog.get_logger("app").error("unhandled error", exc_info=exc)
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    structlog.get_logger("app").info("event", secret=secret, webhook={"secret": secret})
    structlog.get_logger("app").info(f"called with Authorization: Bearer {key}")
    logging.getLogger("sqlalchemy.engine").warning("params %r", {"api_key": key})
    logging.getLogger("custody").warning("token=%s pin=%s", key, "123456")
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1", "GET", "/v1/me?token=" + key, "1.1", 200
    )
    print("done", file=sys.stderr)
    """
)


def test_the_logging_layer_redacts_what_an_engine_and_callers_let_through() -> None:
    """Every path into the log, under the service's own logging set-up: structlog events
    (fields, messages, formatted tracebacks) and stdlib records (uvicorn, SQLAlchemy)."""
    key = "pc_" + "Q" * 43
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, WEBHOOK_SECRET, key],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    log = done.stderr
    assert log.rstrip().endswith("done"), log
    assert "UNIQUE constraint failed" in log and "[parameters: ***]" in log  # still useful
    assert log.count("Traceback") >= 2, log  # one per logger (a chained error shows two)
    assert "Authorization: ***" in log
    assert WEBHOOK_SECRET not in log and key not in log and "123456" not in log, log
    assert "Q" * 20 not in log, log


def test_the_engine_hides_bound_parameters_on_both_databases(engine: Engine) -> None:
    assert engine.hide_parameters
