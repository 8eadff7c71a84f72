"""A delivery worker told to stop (SIGTERM to `custody notify`) sends nothing more and gives
back the events it had claimed but not sent, due at once for the next worker: nothing
waits out a claim's lease (five minutes) because a worker was stopped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.http_server import local_http_server

from custody.db.models import Outbox, Party, PartyKind, utcnow
from custody.db.session import transaction
from custody.netpolicy import UrlPolicy
from custody.notify.delivery import deliver_due
from custody.notify.outbox import enqueue, register_webhook

LOCAL = UrlPolicy.for_network("regtest")
SECRET = "t" * 16 + "-the-stopping-worker-secret-0123"


@pytest.fixture
def stopping_receiver() -> Iterator[tuple[str, threading.Event, list[str]]]:
    """Accepts each POST and sets `stop` at the first: the worker is told to stop while
    it holds more claims."""
    stop = threading.Event()
    got: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            got.append(self.headers["X-Custody-Event-Id"])
            stop.set()
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    with local_http_server(Handler) as base:
        yield f"{base}/hook", stop, got


def test_a_stopped_worker_gives_back_what_it_did_not_send(
    engine: Engine, stopping_receiver: tuple[str, threading.Event, list[str]]
) -> None:
    url, stop, got = stopping_receiver
    with transaction(engine) as s:
        party = Party(name="stopping-miner", kind=PartyKind.miner)
        s.add(party)
        s.flush()
        assert party.id is not None
        register_webhook(s, party.id, url, SECRET, "*", urls=LOCAL)
    ids = []
    for n in range(3):
        with transaction(engine) as s:
            ids += enqueue(
                s,
                party_ids=[party.id],
                event_type="loan.active",
                payload={"loan_id": n, "state_version": 1},
                key=f"loan={n}/state_version=1",
            )
    with httpx.Client(timeout=5, trust_env=False) as client:
        report = deliver_due(engine, client=client, urls=LOCAL, stop=stop)
        assert report.attempted == 1 and report.delivered == 1 and len(got) == 1
        with Session(engine) as s:
            rows = list(s.exec(select(Outbox).order_by(col(Outbox.id))).all())
        waiting = [r for r in rows if r.delivered_at is None]
        assert len(waiting) == 2
        soon = utcnow() + timedelta(seconds=1)
        for row in waiting:  # due now, never attempted: not held for the claim's lease
            due = (
                row.next_attempt_at
                if row.next_attempt_at.tzinfo
                else row.next_attempt_at.replace(tzinfo=soon.tzinfo)
            )
            assert due <= soon and row.attempts == 0

        again = deliver_due(engine, client=client, urls=LOCAL)
    assert again.delivered == 2
    assert sorted(got) == sorted(ids)  # each exactly once
