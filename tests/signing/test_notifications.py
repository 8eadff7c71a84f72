"""Webhooks fired by real events (a deposit on regtest), delivered to a local receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from support.lending import funded_loan
from support.world import World

from custody.netpolicy import UrlPolicy
from custody.notify.delivery import deliver_due, verify_signature
from custody.watcher.service import Watcher
from regtest.node import RegtestNode

SECRET = "a-shared-secret-of-the-miner-0123456789"


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    got: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append({"headers": dict(self.headers), "body": body})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    server.shutdown()
    server.server_close()


def test_a_deposit_notifies_the_miner_with_signed_webhooks(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    receiver: tuple[str, list[dict[str, Any]]],
) -> None:
    url, got = receiver
    r = world.call(
        "miner",
        "POST",
        f"/v1/parties/{world.party_ids['miner']}/webhooks",
        json={
            "url": url,
            "secret": SECRET,
            "events": ["deposit.seen", "deposit.confirmed", "loan.active"],
        },
    )
    assert r.status_code == 201, r.text
    assert "secret" not in r.json()
    funded_loan(world, regtest_node, watcher)  # pays, mines, the watcher confirms
    with httpx.Client(trust_env=False) as client:
        report = deliver_due(world.engine, client=client, urls=UrlPolicy.for_network("regtest"))
    assert report.delivered == 3, report
    types = [json.loads(g["body"])["type"] for g in got]
    assert sorted(types) == ["deposit.confirmed", "deposit.seen", "loan.active"]
    for g in got:
        h = {k.lower(): v for k, v in g["headers"].items()}
        assert verify_signature(
            SECRET, h["x-custody-timestamp"], g["body"], h["x-custody-signature"]
        )
        assert not verify_signature(
            "wrong" * 8, h["x-custody-timestamp"], g["body"], h["x-custody-signature"]
        )
    with httpx.Client(trust_env=False) as client:
        assert (
            deliver_due(
                world.engine, client=client, urls=UrlPolicy.for_network("regtest")
            ).attempted
            == 0
        )  # each event once


def test_prices_are_set_by_bank_staff_and_validated(world: World) -> None:
    r = world.call("bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": "6150000.25"})
    assert r.status_code == 201 and r.json()["proposed_by"] == "bank_operator:user-bank_operator"
    r = world.call("bank_approver", "POST", f"/v1/prices/{r.json()['id']}/confirm")
    assert r.status_code == 200 and r.json()["state"] == "confirmed", r.text
    assert (
        world.call("auditor", "GET", "/v1/prices/latest").json()["price_rub_per_btc"]
        == "6150000.25"
    )
    assert (
        world.call("miner", "POST", "/v1/prices", json={"price_rub_per_btc": "1"}).status_code
        == 403
    )
    for bad in ("0", "-5", "abc", "1.123456789", 6_000_000.5):
        r = world.call("bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": bad})
        assert r.status_code == 422 and r.json()["field"] == "price_rub_per_btc", (bad, r.text)
