"""Webhooks from the transactional outbox, on SQLite and PostgreSQL, against a real
local HTTP receiver (127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.http_server import local_http_server

from custody.db.models import Outbox, Party, PartyKind, Webhook
from custody.db.session import transaction
from custody.netpolicy import UrlPolicy
from custody.notify.delivery import (
    DeliveryWorker,
    RetryPolicy,
    deliver_due,
    verify_signature,
)
from custody.notify.outbox import (
    deactivate_webhook,
    enqueue,
    list_webhooks,
    register_webhook,
)
from pledge.errors import InvalidInput, NotFound
from regtest.wait import wait_until

LOCAL = UrlPolicy.for_network("regtest")  # https anywhere, plain http to loopback

SECRET_A = "a" * 16 + "-shared-secret-of-party-one-0123"
SECRET_B = "b" * 16 + "-shared-secret-of-party-two-4567"


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """Paths: /flaky fails (500) the first two attempts of each event id, then accepts;
    /down always fails; anything else accepts at once."""

    base: str = ""
    seen: list[Seen] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> int:
        event_id = headers.get("x-custody-event-id", "")
        with self.lock:
            earlier = sum(
                1
                for s in self.seen
                if s.path == path and s.headers.get("x-custody-event-id") == event_id
            )
            status = 500 if path == "/down" or (path == "/flaky" and earlier < 2) else 204
            self.seen.append(Seen(path, headers, body, status))
            if status == 204:  # every acceptance is kept, so a duplicate delivery shows up
                self.accepted.append(event_id)
        return status

    def on(self, path: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status = rec.handle(self.path, headers, body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    with local_http_server(Handler) as rec.base:
        yield rec


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # trust_env=False: an HTTP(S)_PROXY in the environment must not see test traffic.
    with httpx.Client(timeout=5.0, trust_env=False) as c:
        yield c


def _party(engine: Engine, name: str, kind: PartyKind = PartyKind.miner) -> int:
    with transaction(engine) as s:
        party = Party(name=name, kind=kind)
        s.add(party)
        s.flush()
        assert party.id is not None
        return party.id


def _independent_signature(secret: str, timestamp: str, body: bytes) -> str:
    """Computed here, not by the code under test, so a shared bug cannot hide."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def _outbox(engine: Engine) -> list[Outbox]:
    with Session(engine) as s:
        return list(s.exec(select(Outbox).order_by(col(Outbox.id))).all())


def test_flaky_receiver_gets_each_event_once_signed_with_growing_backoff(
    engine: Engine, receiver: Receiver, client: httpx.Client
) -> None:
    miner = _party(engine, "miner-1")
    bank = _party(engine, "bank-1", PartyKind.bank)
    with transaction(engine) as s:
        register_webhook(s, miner, f"{receiver.base}/flaky", SECRET_A, "*", urls=LOCAL)
        register_webhook(s, bank, f"{receiver.base}/other", SECRET_B, ["loan.active"], urls=LOCAL)

    with transaction(engine) as s:
        ids = enqueue(
            s,
            party_ids=[miner, bank],
            event_type="deposit.confirmed",
            payload={"loan_id": 7},
            key="loan=7/confirmed",
        )
        ids += enqueue(
            s,
            party_ids=[miner, bank, miner],
            event_type="loan.margin_call",
            key="loan=7/margin-call",
            payload={"loan_id": 7, "ltv_bps": 8100},
        )
    assert len(ids) == 2 and len(set(ids)) == 2  # only the miner's hook wants these

    lost: list[str] = []
    with pytest.raises(RuntimeError), transaction(engine) as s:
        lost = enqueue(
            s, party_ids=[miner], event_type="liquidation.started", payload={}, key="lost"
        )
        s.flush()
        raise RuntimeError("the state change failed")
    assert len(lost) == 1
    assert len(_outbox(engine)) == 2

    t0 = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)  # all rows due
    for step in range(30):
        deliver_due(engine, client=client, urls=LOCAL, now=t0 + timedelta(seconds=step))

    # Accepted exactly once each; the rolled-back event never existed; the bank's hook
    # (subscribed to loan.active only) got nothing.
    assert Counter(receiver.accepted) == Counter(ids)
    assert receiver.on("/other") == []
    flaky = receiver.on("/flaky")
    assert not any(s.headers["x-custody-event-id"] in lost for s in receiver.seen)
    assert len(flaky) == 6 and [s.status for s in flaky].count(500) == 4

    for seen in flaky:
        ts = seen.headers["x-custody-timestamp"]
        sig = seen.headers["x-custody-signature"]
        assert sig == _independent_signature(SECRET_A, ts, seen.body)
        assert verify_signature(SECRET_A, ts, seen.body, sig)
        assert not verify_signature(SECRET_B, ts, seen.body, sig)
        assert not verify_signature(SECRET_A, ts, seen.body + b" ", sig)
        assert not verify_signature(SECRET_A, str(int(ts) + 1), seen.body, sig)
        doc = json.loads(seen.body)
        assert set(doc) == {"id", "type", "created_at", "data"}
        assert doc["id"] == seen.headers["x-custody-event-id"]
        assert doc["type"] in {"deposit.confirmed", "loan.margin_call"}
        assert doc["data"]["loan_id"] == 7

    for event_id in ids:
        times = [
            int(s.headers["x-custody-timestamp"])
            for s in flaky
            if s.headers["x-custody-event-id"] == event_id
        ]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert times[0] == int(t0.timestamp())
        assert gaps == [2, 4]  # 2**1 then 2**2 seconds: the backoff grew

    rows = _outbox(engine)
    assert [r.event_id for r in rows] == ids
    for row in rows:
        assert row.attempts == 3
        assert row.delivered_at is not None and row.dead_at is None
        assert row.last_error == "HTTP 500"  # the failure before the success, kept
    # Nothing is due any more, however late it gets.
    later = deliver_due(engine, client=client, urls=LOCAL, now=t0 + timedelta(days=2))
    assert later.attempted == 0


def test_retries_give_up_and_keep_the_row_and_deactivated_hooks_are_not_called(
    engine: Engine, receiver: Receiver, client: httpx.Client
) -> None:
    miner = _party(engine, "miner-2")
    arbiter = _party(engine, "arbiter-2", PartyKind.arbiter)
    with transaction(engine) as s:
        register_webhook(
            s, miner, f"{receiver.base}/down", SECRET_A, ["signature.needed"], urls=LOCAL
        )
        gone = register_webhook(s, arbiter, f"{receiver.base}/gone", SECRET_B, "*", urls=LOCAL)
    with transaction(engine) as s:
        (down_id,) = enqueue(
            s, party_ids=[miner], event_type="signature.needed", payload={}, key="down"
        )
        (gone_id,) = enqueue(
            s, party_ids=[arbiter], event_type="signature.needed", payload={}, key="gone"
        )
        deactivate_webhook(s, gone.id)
    with transaction(engine) as s:  # deactivated: no new events at all
        assert enqueue(s, party_ids=[arbiter], event_type="loan.active", payload={}, key="") == []

    policy = RetryPolicy(max_attempts=3, base_seconds=1.0, cap_seconds=3.0)
    t0 = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)  # all rows due
    reports = [
        deliver_due(engine, client=client, urls=LOCAL, now=t0 + timedelta(seconds=n), policy=policy)
        for n in range(20)
    ]
    assert sum(r.dead for r in reports) == 2
    assert sum(r.delivered for r in reports) == 0

    down = receiver.on("/down")
    assert [s.headers["x-custody-event-id"] for s in down] == [down_id] * 3
    times = [int(s.headers["x-custody-timestamp"]) for s in down]
    assert [b - a for a, b in itertools.pairwise(times)] == [2, 3]  # capped at 3 s
    assert receiver.on("/gone") == []

    rows = {r.event_id: r for r in _outbox(engine)}
    assert rows[down_id].attempts == 3 and rows[down_id].dead_at is not None
    assert rows[down_id].delivered_at is None and rows[down_id].last_error == "HTTP 500"
    assert rows[gone_id].dead_at is not None and rows[gone_id].last_error == "webhook deactivated"
    assert deliver_due(engine, client=client, urls=LOCAL, now=t0 + timedelta(days=1)).attempted == 0


def test_registration_is_validated_and_listings_never_show_the_secret(engine: Engine) -> None:
    party = _party(engine, "bank-3", PartyKind.bank)
    bad: list[tuple[str, str, object]] = [
        ("http://example.com/hook", SECRET_A, "*"),  # plain http off this machine
        ("http://10.0.0.1/hook", SECRET_A, "*"),
        ("ftp://127.0.0.1/hook", SECRET_A, "*"),
        ("https://user:pw@example.com/hook", SECRET_A, "*"),
        ("https:///nohost", SECRET_A, "*"),
        ("https://example.com/hook", "too-short-secret", "*"),
        ("https://example.com/hook", SECRET_A, ["loan.exploded"]),
        ("https://example.com/hook", SECRET_A, ["*", "loan.active"]),
        ("https://example.com/hook", SECRET_A, []),
    ]
    for url, secret, events in bad:
        with pytest.raises(InvalidInput), transaction(engine) as s:
            register_webhook(s, party, url, secret, events, urls=LOCAL)  # type: ignore[arg-type]
    with pytest.raises(NotFound), transaction(engine) as s:
        register_webhook(s, 999_999, "https://example.com/hook", SECRET_A, "*", urls=LOCAL)

    with transaction(engine) as s:
        register_webhook(
            s, party, "https://example.com/hook", SECRET_A, "loan.active,deposit.seen", urls=LOCAL
        )
        register_webhook(s, party, "http://localhost:9/hook", SECRET_B, "*", urls=LOCAL)
        register_webhook(s, party, "http://[::1]:9/hook", SECRET_B, "*", urls=LOCAL)
    with Session(engine) as s:
        views = list_webhooks(s, party)
        stored = s.exec(select(Webhook)).all()
    assert [v.events for v in views] == [("deposit.seen", "loan.active"), ("*",), ("*",)]
    listing = json.dumps([v.as_dict() for v in views]) + repr(views) + repr(stored)
    assert SECRET_A not in listing and SECRET_B not in listing
    assert "secret" not in views[0].as_dict()

    with transaction(engine) as s, pytest.raises(ValueError):
        enqueue(s, party_ids=[party], event_type="loan.exploded", payload={}, key="boom")


def test_concurrent_workers_deliver_each_event_exactly_once(
    engine: Engine, receiver: Receiver, client: httpx.Client
) -> None:
    party = _party(engine, "miner-4")
    with transaction(engine) as s:
        register_webhook(s, party, f"{receiver.base}/ok", SECRET_A, "*", urls=LOCAL)
    ids: list[str] = []
    for n in range(40):
        with transaction(engine) as s:
            ids += enqueue(
                s, party_ids=[party], event_type="deposit.seen", payload={"n": n}, key=f"n={n}"
            )

    stop = threading.Event()
    workers = [DeliveryWorker(engine, client, urls=LOCAL, batch=3) for _ in range(3)]
    threads = [threading.Thread(target=w.run, args=(stop, 0.02)) for w in workers]
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: all(r.delivered_at is not None for r in _outbox(engine)),
            timeout=60,
            message=lambda: f"{len(receiver.accepted)} of {len(ids)} delivered",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    seen_ids = Counter(s.headers["x-custody-event-id"] for s in receiver.on("/ok"))
    assert seen_ids == Counter(ids)  # every event sent once: no two workers raced on one row
    assert all(r.attempts == 1 for r in _outbox(engine))
