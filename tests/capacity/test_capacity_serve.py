"""The API under concurrent load, as real `custody serve` processes on SQLite and
PostgreSQL: threads, connection pools and row locks are those of production (issue 10:
a replica froze at about 40 requests in flight; concurrent address hand-outs on one loan
failed with 409 on PostgreSQL)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select
from support.custody_serve import custody_replicas, custody_serve, ready_lender

from custody.audit.service import verify_chain
from custody.db.models import AuditEvent, CollateralAddress, Loan
from custody.db.session import transaction
from regtest.wait import wait_until

pytestmark = [pytest.mark.process]  # starts custody/hsm commands as OS processes

T = TypeVar("T")


def concurrently(count: int, call: Callable[[int], T]) -> list[T]:
    """`call(0..count-1)`, all released at once from their own threads."""
    start = threading.Barrier(count)

    def one(i: int) -> T:
        start.wait(timeout=30)
        return call(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def _client() -> httpx.Client:
    return httpx.Client(timeout=20, limits=httpx.Limits(max_connections=200))


def test_fifty_concurrent_hand_outs_on_one_loan_get_contiguous_indexes(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    lender = ready_lender(engine)
    loan_id = lender.loan_ids[0]
    with custody_replicas(db_url, tmp_path, 2) as replicas, _client() as client:
        answers = concurrently(
            50,
            lambda i: client.post(
                f"{replicas[i % 2].url}/v1/loans/{loan_id}/addresses",
                headers=lender.headers("miner" if i % 3 else "operator"),
            ),
        )
    assert Counter(a.status_code for a in answers) == {201: 50}, [a.text for a in answers][:3]
    # index 0 was handed out with the descriptor; the 50 got the next 50, none twice
    assert sorted(a.json()["index"] for a in answers) == list(range(1, 51))
    assert len({a.json()["address"] for a in answers}) == 50
    with transaction(engine, write=False) as session:
        stored = session.exec(
            select(CollateralAddress.index).where(CollateralAddress.loan_id == loan_id)
        ).all()
        loan = session.get(Loan, loan_id)
        issued = session.exec(
            select(AuditEvent.data).where(
                AuditEvent.loan_id == loan_id, AuditEvent.action == "address.issued"
            )
        ).all()
        chain = verify_chain(session)
    assert sorted(stored) == list(range(51))
    assert loan is not None and loan.next_address_index == 51
    assert len(issued) == 51 and chain.ok, chain


def test_eighty_concurrent_reads_neither_freeze_the_service_nor_its_health(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """More requests in flight than threads, and fewer connections than threads: every
    request is answered, and /v1/health answers meanwhile. (A request used to hold its
    connection while it waited for a thread: all of them ended up waiting for 30 s.)"""
    lender = ready_lender(engine)
    small_pool = {"db_pool_size": "5", "db_max_overflow": "5", "api_threads": "40"}
    with custody_serve(db_url, tmp_path, **small_pool) as server, _client() as client:
        health: list[tuple[int, float]] = []
        in_flight = threading.Event()

        def me(i: int) -> tuple[int, float]:
            began = time.monotonic()
            if i == 0:
                in_flight.set()
            answer = client.get(f"{server.url}/v1/me", headers=lender.headers())
            return answer.status_code, time.monotonic() - began

        def check_health() -> None:
            in_flight.wait(timeout=30)
            began = time.monotonic()
            answer = client.get(f"{server.url}/v1/health")
            health.append((answer.status_code, time.monotonic() - began))

        checker = threading.Thread(target=check_health)
        checker.start()
        began = time.monotonic()
        answers = concurrently(80, me)
        elapsed = time.monotonic() - began
        checker.join(timeout=30)
    assert Counter(status for status, _ in answers) == {200: 80}, server.log()[-2000:]
    assert elapsed < 20, f"80 reads took {elapsed:.1f}s"
    assert health and health[0][0] == 200 and health[0][1] < 10, health


def test_overload_is_refused_at_once_with_503(db_url: str, engine: Engine, tmp_path: Path) -> None:
    """Past `api_limit_concurrency` connections and requests in flight the answer is an
    immediate 503 (uvicorn counts open connections too: on a slow machine all 80 may be
    open before the first request is read, and then all 80 are refused), never a wait
    or a 500; the service answers normally once the burst is over."""
    lender = ready_lender(engine)
    with custody_serve(db_url, tmp_path, api_limit_concurrency="8") as server:
        with _client() as client:  # its kept-alive connections count until it closes
            began = time.monotonic()
            answers = concurrently(
                80,
                lambda _: client.get(f"{server.url}/v1/loans", headers=lender.headers()),
            )
            elapsed = time.monotonic() - began
        after: list[httpx.Response] = []

        def answers_normally() -> bool:
            after.append(httpx.get(f"{server.url}/v1/loans", headers=lender.headers()))
            return after[-1].status_code == 200

        wait_until(answers_normally, timeout=10, message=lambda: f"GET /v1/loans: {after[-1]}")
    statuses = Counter(a.status_code for a in answers)
    assert 503 in statuses and set(statuses) <= {200, 503}, statuses
    assert elapsed < 20, f"80 answers took {elapsed:.1f}s"
    assert after[-1].json()[0]["id"] == lender.loan_ids[0]


def test_writers_waiting_for_the_write_lock_never_take_every_thread(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """Four API threads, twenty concurrent hand-outs on one loan. Before the write gate
    each waiting writer held a thread inside the database's lock wait, and the writer
    holding the lock needed a thread back to commit: with more writers than threads the
    service stood still until the busy timeout (30 s), and the waiters failed. Now writers
    queue on the event loop and every hand-out succeeds, promptly."""
    lender = ready_lender(engine)
    loan_id = lender.loan_ids[0]
    with custody_serve(db_url, tmp_path, api_threads="4") as server, _client() as client:
        t0 = time.monotonic()
        answers = concurrently(
            20,
            lambda i: client.post(
                f"{server.url}/v1/loans/{loan_id}/addresses", headers=lender.headers("miner")
            ),
        )
        seconds = time.monotonic() - t0
        health = client.get(f"{server.url}/v1/health")
    assert Counter(a.status_code for a in answers) == {201: 20}, [a.text for a in answers][:3]
    assert sorted(a.json()["index"] for a in answers) == list(range(1, 21))
    assert seconds < 15, f"twenty hand-outs took {seconds:.1f} s: writers blocked the threads"
    assert health.status_code == 200


def test_two_worker_processes_serve_one_database(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """`CUSTODY_API_WORKERS=2`: one `custody serve`, two processes (each its own threads,
    pool and write gate) on one database: reads and concurrent hand-outs all answer, and
    the indexes stay contiguous."""
    lender = ready_lender(engine)
    loan_id = lender.loan_ids[0]
    with custody_serve(db_url, tmp_path, api_workers="2") as server, _client() as client:
        answers = concurrently(
            16,
            lambda i: (
                client.post(
                    f"{server.url}/v1/loans/{loan_id}/addresses", headers=lender.headers("miner")
                )
                if i % 2
                else client.get(f"{server.url}/v1/loans/{loan_id}", headers=lender.headers("miner"))
            ),
        )
        # The second worker may start after the first answered everything (busy cores).
        wait_until(
            lambda: server.log().count("Started server process") >= 2,
            30,
            message=lambda: f"two worker processes in the log:\n{server.log()}",
        )
    assert Counter(a.status_code for a in answers) == {200: 8, 201: 8}, [a.text for a in answers]
    assert sorted(a.json()["index"] for a in answers if a.status_code == 201) == list(range(1, 9))
