"""The commercial provider's HTTP adapter against a local fake server: the documented
request, a good answer, and every way of not answering (an error status, bad JSON, a
slow server) failing closed as `review`, never clear; the key never in a log line."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import pytest
import structlog
from pydantic import SecretStr
from support.http_server import answer, local_http_server

from custody.screening.http import HttpProvider
from custody.screening.providers import (
    UNAVAILABLE,
    AddressSubject,
    Input,
    Result,
    TransactionSubject,
)

KEY = "sk-test-" + "9" * 24
SUBJECT = TransactionSubject("aa" * 32, 1, 25_000_000, (Input("bb" * 32, 0, "bcrt1qsource"),))


class FakeScreening(BaseHTTPRequestHandler):
    """Answers what `reply` says; keeps every request it saw."""

    reply: ClassVar[tuple[int, bytes]] = (200, b"{}")
    delay: ClassVar[threading.Event | None] = None
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeScreening.seen.append(
            {"path": self.path, "auth": self.headers["Authorization"], "body": body}
        )
        if FakeScreening.delay is not None:
            FakeScreening.delay.wait(5)  # longer than the adapter's timeout
        status, payload = FakeScreening.reply
        answer(self, status, payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    FakeScreening.seen, FakeScreening.delay = [], None
    with local_http_server(FakeScreening) as url:
        yield url
    if FakeScreening.delay is not None:
        FakeScreening.delay.set()


def _provider(url: str, timeout: float = 2.0) -> HttpProvider:
    return HttpProvider(url, SecretStr(KEY), network="regtest", timeout=timeout)


def test_the_request_and_a_good_answer(server: str) -> None:
    answer = {"result": "block", "score": 91, "reasons": ["darknet market"], "reference": "C-7"}
    FakeScreening.reply = (200, json.dumps(answer).encode())
    decision = _provider(server).screen(SUBJECT)
    assert (decision.result, decision.score) == (Result.block, 91)
    assert (decision.reasons, decision.reference, decision.provider) == (
        ["darknet market"],
        "C-7",
        "http",
    )
    [seen] = FakeScreening.seen
    assert seen["path"] == "/v1/screen" and seen["auth"] == f"Bearer {KEY}"
    assert seen["body"] == {
        "network": "regtest",
        "subject": {
            "kind": "transaction",
            "txid": "aa" * 32,
            "vout": 1,
            "amount_sats": 25_000_000,
            "inputs": [{"txid": "bb" * 32, "vout": 0, "address": "bcrt1qsource"}],
        },
    }


def test_an_address_subject(server: str) -> None:
    FakeScreening.reply = (200, b'{"result": "clear", "score": 3, "reasons": []}')
    decision = _provider(server).screen(AddressSubject("bcrt1qpayout", "bank_liquidation"))
    assert decision.result == Result.clear
    assert FakeScreening.seen[0]["body"]["subject"] == {
        "kind": "address",
        "address": "bcrt1qpayout",
        "purpose": "bank_liquidation",
    }


@pytest.mark.parametrize(
    "reply",
    [
        (500, b'{"result": "clear", "score": 0}'),  # an error status, whatever it says
        (200, b"not json"),
        (200, b'{"result": "fine", "score": 0}'),  # not one of the three results
        (200, b'{"result": "clear", "score": 101}'),  # out of range
        (200, b'{"score": 0}'),
        (200, b"[]"),
    ],
)
def test_anything_but_the_documented_answer_is_review(
    server: str, reply: tuple[int, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    FakeScreening.reply = reply
    with structlog.testing.capture_logs() as logs:
        decision = _provider(server).screen(SUBJECT)
    assert decision.result == Result.review  # never clear
    assert decision.reasons[0].startswith(UNAVAILABLE)
    assert KEY not in json.dumps(logs, default=str) and KEY not in capsys.readouterr().err


def test_a_slow_server_times_out_to_review(server: str) -> None:
    FakeScreening.delay = threading.Event()
    FakeScreening.reply = (200, b'{"result": "clear", "score": 0}')
    decision = _provider(server, timeout=0.3).screen(SUBJECT)
    FakeScreening.delay.set()
    assert decision.result == Result.review
    assert decision.reasons == [f"{UNAVAILABLE}: timed out after 0.3s"]


def test_nobody_listening_is_review() -> None:
    with local_http_server(FakeScreening) as url:
        pass  # the server is gone again: the port refuses
    decision = _provider(url, timeout=1.0).screen(SUBJECT)
    assert decision.result == Result.review and UNAVAILABLE in decision.reasons[0]
