"""`custody notify` as an OS process (issue 16, "Processes as processes"): it delivers a
webhook to a local receiver, shows in `/v1/health` while it runs, stops cleanly on
SIGTERM, and after a SIGKILL in the middle of a delivery a new one delivers the event
again under the same id (at least once; the receiver dedupes by id) and records it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from support.http_server import local_http_server
from support.processes import custody_command, heartbeats

from custody.config import Settings
from custody.db.models import Outbox, Party, PartyKind
from custody.db.session import transaction
from custody.netpolicy import UrlPolicy
from custody.notify.delivery import verify_signature
from custody.notify.outbox import enqueue, register_webhook
from custody.root import Root
from regtest.wait import wait_until

pytestmark = [pytest.mark.process]

SECRET = "n" * 16 + "-the-notify-process-secret-01234"


@dataclass
class Receiver:
    """Accepts every POST (204); on /hold, only once `release` is set."""

    base: str = ""
    accepted: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ids(self) -> list[str]:
        with self.lock:
            return [headers["x-custody-event-id"] for _, headers, _ in self.accepted]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            if self.path == "/hold":
                rec.arrived.set()
                if not rec.release.wait(timeout=60):
                    return  # never answered
            with rec.lock:
                rec.accepted.append((self.path, headers, body))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    with local_http_server(Handler) as base:
        rec.base = base
        try:
            yield rec
        finally:
            rec.release.set()  # a held request must not keep the server from stopping


def _queue_event(engine: Engine, url: str) -> str:
    """A miner's webhook at `url` and one event queued for it: its id."""
    with transaction(engine) as s:
        party = Party(name="notify-process-miner", kind=PartyKind.miner)
        s.add(party)
        s.flush()
        assert party.id is not None
        register_webhook(s, party.id, url, SECRET, "*", urls=UrlPolicy.for_network("regtest"))
    with transaction(engine) as s:
        ids = enqueue(
            s,
            party_ids=[party.id],
            event_type="deposit.confirmed",
            payload={"loan_id": 1, "txid": "ab" * 32, "vout": 0},
            key="loan=1/txid=" + "ab" * 32 + "/vout=0",
        )
    assert len(ids) == 1
    return ids[0]


def _outbox(engine: Engine) -> list[Outbox]:
    with Session(engine) as s:
        return list(s.exec(select(Outbox)).all())


def _health(db_url: str, engine: Engine) -> dict[str, Any]:
    root = Root.assemble(Settings(network="regtest", database_url=db_url), engine=engine)
    with TestClient(root.app()) as client:
        answer = client.get("/v1/health")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_notify_process_delivers_shows_in_health_and_stops_on_sigterm(
    tmp_path: Path, db_url: str, engine: Engine, receiver: Receiver
) -> None:
    event_id = _queue_event(engine, f"{receiver.base}/ok")
    notify = custody_command(tmp_path, db_url, "notify").start()
    try:
        wait_until(lambda: receiver.ids() == [event_id], timeout=30, message=notify.log)
        _, headers, body = receiver.accepted[0]
        assert verify_signature(
            SECRET, headers["x-custody-timestamp"], body, headers["x-custody-signature"]
        )
        wait_until(
            lambda: all(row.delivered_at is not None for row in _outbox(engine)),
            timeout=30,
            message=notify.log,
        )
        wait_until(lambda: heartbeats(engine, "notify")[0].passes >= 2, timeout=30)
        workers = _health(db_url, engine)["workers"]
        (shown,) = workers["notify"]
        assert shown["alive"] is True and shown["passes"] >= 2
        assert shown["last_error"] is None and shown["last_ok_at"] is not None
        assert workers["risk"] == []
    finally:
        code = notify.terminate()
    assert code == 0, notify.log()
    (row,) = heartbeats(engine, "notify")
    assert row.stopped_at is not None  # a clean stop says so: health lists it no more
    assert _health(db_url, engine)["workers"]["notify"] == []
    assert receiver.ids() == [event_id]  # once


def test_notify_killed_mid_delivery_the_next_one_delivers_it_under_the_same_id(
    tmp_path: Path, db_url: str, engine: Engine, receiver: Receiver
) -> None:
    event_id = _queue_event(engine, f"{receiver.base}/hold")
    first = custody_command(
        tmp_path / "first", db_url, "notify", notify_timeout_seconds="2", notify_claim_seconds="4"
    ).start()
    try:
        assert receiver.arrived.wait(timeout=30), first.log()
    finally:
        first.kill()  # the receiver has the request; the worker never hears its answer
    (row,) = _outbox(engine)
    assert row.delivered_at is None and row.dead_at is None
    receiver.release.set()  # the held request now completes: the receiver has it once
    wait_until(lambda: receiver.ids() == [event_id], timeout=10)
    (dead,) = heartbeats(engine, "notify")
    assert dead.stopped_at is None  # a killed process never said it stopped

    second = custody_command(
        tmp_path / "second", db_url, "notify", notify_timeout_seconds="2", notify_claim_seconds="4"
    ).start()
    try:
        # The dead worker's claim runs out (4 s), then the event goes again, same id.
        wait_until(
            lambda: all(r.delivered_at is not None for r in _outbox(engine)),
            timeout=30,
            message=second.log,
        )
    finally:
        assert second.terminate() == 0, second.log()
    assert receiver.ids() == [event_id, event_id]  # at least once, never a new id
    (row,) = _outbox(engine)
    assert row.attempts >= 1 and row.delivered_at is not None
