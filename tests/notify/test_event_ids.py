"""Event ids derived from facts, and an outbox that queues each (webhook, event) once, on
SQLite and PostgreSQL, however often or concurrently a fact is reported."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.databases import wait_for_a_lock_wait

from custody.db.models import Outbox, Party, PartyKind
from custody.db.session import transaction
from custody.netpolicy import UrlPolicy
from custody.notify import repository
from custody.notify.events import event_key
from custody.notify.outbox import enqueue, event_id, register_webhook

LOCAL = UrlPolicy.for_network("regtest")  # the tests' receivers: plain http on loopback

SECRET = "k" * 40
FACT = "loan=7/txid=" + "ab" * 32 + "/vout=1/block_hash=" + "cd" * 32 + "/retractions=0"


def _hooks(engine: Engine) -> tuple[int, int, int, int]:
    """Two parties (miner, bank) and one webhook each, wanting everything."""
    with transaction(engine) as s:
        miner, bank = Party(name="m", kind=PartyKind.miner), Party(name="b", kind=PartyKind.bank)
        s.add_all([miner, bank])
        s.flush()
        assert miner.id is not None and bank.id is not None
        miner_hook = register_webhook(s, miner.id, "http://127.0.0.1:9/m", SECRET, "*", urls=LOCAL)
        bank_hook = register_webhook(s, bank.id, "http://127.0.0.1:9/b", SECRET, "*", urls=LOCAL)
    return miner.id, bank.id, miner_hook.id, bank_hook.id


def _rows(engine: Engine) -> list[tuple[int, str, str]]:
    with Session(engine) as s:
        rows = s.exec(select(Outbox).order_by(col(Outbox.id))).all()
        return [(r.webhook_id, r.event_id, r.event_type) for r in rows]


def test_an_event_id_is_the_fact_it_reports_for_ever() -> None:
    """Receivers store these ids: the derivation may never change."""
    assert event_id("deposit.confirmed", FACT) == "b13e62d0-49c3-5a86-9111-4cf1caf27643"
    assert event_id("deposit.confirmed", FACT) != event_id("deposit.unconfirmed", FACT)
    assert event_id("deposit.confirmed", FACT) != event_id("deposit.confirmed", FACT + "1")
    payload = {"txid": "ab" * 32, "vout": 1, "block_hash": "cd" * 32, "retractions": 0}
    assert event_key("deposit.confirmed", 7, {**payload, "amount_sats": 5}) == FACT
    with pytest.raises(KeyError):  # a fact without its block would collide with others
        event_key("deposit.confirmed", 7, {"txid": "ab" * 32, "vout": 1, "retractions": 0})


def test_a_fact_is_queued_once_per_webhook_however_often_it_is_reported(
    engine: Engine,
) -> None:
    miner, bank, miner_hook, bank_hook = _hooks(engine)
    with transaction(engine) as s:
        ids = enqueue(
            s, party_ids=[miner, bank], event_type="deposit.confirmed", payload={}, key=FACT
        )
        again = enqueue(s, party_ids=[bank], event_type="deposit.confirmed", payload={}, key=FACT)
    the_id = event_id("deposit.confirmed", FACT)
    assert ids == [the_id, the_id] and again == [the_id]
    first = _rows(engine)
    assert sorted(first) == sorted(
        [(miner_hook, the_id, "deposit.confirmed"), (bank_hook, the_id, "deposit.confirmed")]
    )
    for _ in range(2):  # replays, in later transactions
        with transaction(engine) as s:
            enqueue(
                s, party_ids=[miner, bank], event_type="deposit.confirmed", payload={}, key=FACT
            )
    assert _rows(engine) == first
    with transaction(engine) as s:  # another fact is another event
        enqueue(s, party_ids=[bank], event_type="deposit.unconfirmed", payload={}, key=FACT)
    assert _rows(engine)[-1] == (
        bank_hook,
        event_id("deposit.unconfirmed", FACT),
        "deposit.unconfirmed",
    )
    assert len(_rows(engine)) == 3


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_two_writers_of_one_fact_on_postgresql_queue_it_once_and_neither_fails(
    engine: Engine,
) -> None:
    """The second INSERT waits on the first's uncommitted row, then skips it."""
    _, bank, _, bank_hook = _hooks(engine)
    row = {
        "event_id": event_id("loan.active", "loan=7/state_version=3"),
        "webhook_id": bank_hook,
        "event_type": "loan.active",
        "payload": "{}",
        "created_at": datetime(2026, 12, 8, tzinfo=UTC),
        "attempts": 0,
        "next_attempt_at": datetime(2026, 12, 8, tzinfo=UTC),
        "delivered_at": None,
        "dead_at": None,
        "last_error": None,
    }
    errors: list[BaseException] = []

    def second_writer() -> None:
        try:
            with transaction(engine) as s:
                enqueue(
                    s,
                    party_ids=[bank],
                    event_type="loan.active",
                    payload={},
                    key="loan=7/state_version=3",
                )
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    first = Session(engine)
    try:
        repository.insert_events_if_absent(first, [row])  # inserted, not committed
        writer = threading.Thread(target=second_writer)
        writer.start()
        wait_for_a_lock_wait(engine)
        first.commit()
    finally:
        first.close()
    writer.join(timeout=20)
    assert not writer.is_alive() and errors == []
    assert _rows(engine) == [(bank_hook, row["event_id"], "loan.active")]
