"""NodeRpc against a tiny fake JSON-RPC server on 127.0.0.1: request shape and error mapping.

The fake answers like Bitcoin Core or btcd would; the real-btcd behaviour is
covered in test_regtest_node.py.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from support.http_server import answer

from custody.chain.rpc import (
    NodeRpc,
    RpcBlockNotFound,
    RpcError,
    RpcInvalidParams,
    RpcMethodNotFound,
    RpcNotFound,
    RpcTxAlreadyKnown,
    RpcTxRejected,
    RpcUnavailable,
    btc_to_sat,
)
from pledge.errors import CustodyError, InvalidInput, Unsupported, UpstreamUnavailable
from regtest.node import free_port

PASSWORD = "s3cret-pass-word"
# (status, body) or None to close the connection without a reply (what btcd does for id=null).
Reply = tuple[int, bytes] | None
Responder = Callable[[dict[str, Any]], Reply]


class FakeNode:
    """Records requests; answers with ``responder(request)``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.responder: Responder = lambda req: ok(req, None)
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.headers.append(dict(self.headers))
                reply = fake.responder(body)
                if reply is None:
                    self.close_connection = True
                    return
                answer(self, *reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # e.g. the timeout test's client hung up before the reply

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def ok(req: dict[str, Any], result: Any) -> Reply:
    return 200, json.dumps({"result": result, "error": None, "id": req["id"]}).encode()


def err(req: dict[str, Any], code: int, message: str, status: int = 200) -> Reply:
    body = {"result": None, "error": {"code": code, "message": message}, "id": req["id"]}
    return status, json.dumps(body).encode()


def by_method(table: dict[str, Callable[[dict[str, Any]], Reply]]) -> Responder:
    return lambda req: table[req["method"]](req)


BTCD_KIND = {
    "getnetworkinfo": lambda r: err(r, -1, "Command unimplemented"),
    "version": lambda r: ok(r, {"btcdjsonrpcapi": {"versionstring": "1.3.0"}}),
}
CORE_KIND = {
    "getnetworkinfo": lambda r: ok(r, {"version": 270000, "subversion": "/Satoshi:27.0.0/"}),
}


@pytest.fixture
def fake() -> Iterator[FakeNode]:
    node = FakeNode()
    yield node
    node.close()


@pytest.fixture
def rpc(fake: FakeNode) -> Iterator[NodeRpc]:
    client = NodeRpc(fake.url, "alice", PASSWORD, timeout=5.0, mining_address="bcrt1qminer")
    yield client
    client.close()


def test_request_shape_jsonrpc_unique_ids_positional_params_basic_auth(
    fake: FakeNode, rpc: NodeRpc
) -> None:
    fake.responder = lambda req: ok(req, 42)
    assert rpc.call("getblockhash", 7) == 42
    assert rpc.call("gettxout", "ab" * 32, 1, True) == 42
    first, second = fake.requests
    assert first["jsonrpc"] == "1.0"
    assert first["method"] == "getblockhash"
    assert first["params"] == [7]
    assert second["params"] == ["ab" * 32, 1, True]
    assert isinstance(first["id"], int) and isinstance(second["id"], int)
    assert first["id"] != second["id"]
    expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert fake.headers[0]["Authorization"] == expected
    assert fake.headers[0]["Content-Type"] == "application/json"


def test_no_params_is_an_empty_list(fake: FakeNode, rpc: NodeRpc) -> None:
    fake.responder = lambda req: ok(req, 5)
    assert rpc.get_block_count() == 5
    assert fake.requests[0]["params"] == []


@pytest.mark.parametrize(
    ("method", "code", "message", "status", "expected"),
    [
        ("foo", -32601, "Method not found", 200, RpcMethodNotFound),  # btcd and Core
        ("getnetworkinfo", -1, "Command unimplemented", 200, RpcMethodNotFound),  # btcd
        ("foo", -32601, "Method not found", 404, RpcMethodNotFound),  # Core: HTTP 404
        ("getblockcount", -32602, "wrong number of params", 200, RpcInvalidParams),  # btcd
        ("getblockhash", -1, "getblockhash height\n\nReturns hash...", 500, RpcInvalidParams),
        ("getblockhash", -8, "Block height out of range", 500, RpcInvalidParams),  # Core
        ("getblock", -5, "Block not found", 200, RpcBlockNotFound),
        ("getrawtransaction", -5, "No such mempool or blockchain transaction", 500, RpcNotFound),
        ("sendrawtransaction", -26, "TX rejected: insufficient fee", 200, RpcTxRejected),
        ("sendrawtransaction", -25, "TX rejected: orphan transaction", 200, RpcTxRejected),
        ("sendrawtransaction", -22, "TX decode failed", 500, RpcTxRejected),
        (
            "sendrawtransaction",
            -26,
            "TX rejected: already have transaction in mempool",
            200,
            RpcTxAlreadyKnown,
        ),
        ("sendrawtransaction", -27, "Transaction already in block chain", 500, RpcTxAlreadyKnown),
        ("getblockhash", -1, "Block number out of range", 200, RpcError),  # btcd's misc -1
    ],
)
def test_error_mapping(
    fake: FakeNode,
    rpc: NodeRpc,
    method: str,
    code: int,
    message: str,
    status: int,
    expected: type[RpcError],
) -> None:
    fake.responder = lambda req: err(req, code, message, status)
    with pytest.raises(RpcError) as caught:
        rpc.call(method, "x")
    assert type(caught.value) is expected
    assert caught.value.rpc_code == code
    assert caught.value.rpc_message == message
    assert caught.value.method == method
    assert isinstance(caught.value, CustodyError)
    assert PASSWORD not in str(caught.value)


def test_core_warmup_is_unavailable(fake: FakeNode, rpc: NodeRpc) -> None:
    fake.responder = lambda req: err(req, -28, "Loading block index...", 500)
    with pytest.raises(RpcUnavailable, match="warming up"):
        rpc.get_block_count()


def test_auth_rejected_is_unavailable_and_hides_password(fake: FakeNode, rpc: NodeRpc) -> None:
    fake.responder = lambda req: (401, b"401 Unauthorized.\n")
    with pytest.raises(RpcUnavailable, match="credentials") as caught:
        rpc.get_block_count()
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(rpc)


@pytest.mark.parametrize(
    "reply",
    [
        None,  # connection closed with no reply: btcd's answer to a null id
        (200, b"not json"),
        (200, b"[1, 2]"),
        (502, b"<html>bad gateway</html>"),
    ],
)
def test_garbage_replies_are_unavailable(fake: FakeNode, rpc: NodeRpc, reply: Reply) -> None:
    fake.responder = lambda req: reply
    with pytest.raises(RpcUnavailable):
        rpc.get_block_count()


def test_reply_with_other_id_is_rejected(fake: FakeNode, rpc: NodeRpc) -> None:
    fake.responder = lambda req: (200, json.dumps({"result": 1, "error": None, "id": 999}).encode())
    with pytest.raises(RpcUnavailable, match="id"):
        rpc.get_block_count()


def test_connection_refused_is_unavailable() -> None:
    client = NodeRpc(f"http://127.0.0.1:{free_port()}", "u", PASSWORD, timeout=2.0)
    with pytest.raises(RpcUnavailable) as caught:
        client.get_block_count()
    assert isinstance(caught.value, UpstreamUnavailable)
    assert PASSWORD not in str(caught.value)


def test_timeout_is_unavailable(fake: FakeNode) -> None:
    def stall(req: dict[str, Any]) -> Reply:
        fake.release.wait(10)
        return ok(req, 1)

    fake.responder = stall
    client = NodeRpc(fake.url, "u", PASSWORD, timeout=0.2)
    with pytest.raises(RpcUnavailable, match="timed out"):
        client.get_block_count()
    fake.release.set()
    client.close()


def test_credentials_in_url_are_refused() -> None:
    with pytest.raises(InvalidInput) as caught:
        NodeRpc(f"http://u:{PASSWORD}@127.0.0.1:1", "u", PASSWORD)
    assert caught.value.field == "url"
    assert PASSWORD not in str(caught.value)


def test_btcd_dialect(fake: FakeNode, rpc: NodeRpc) -> None:
    fake.responder = by_method(
        {
            **BTCD_KIND,
            "generate": lambda r: ok(r, ["aa", "bb"]),
            "testmempoolaccept": lambda r: ok(
                r, [{"txid": "t", "reject-reason": "missing-inputs"}]
            ),
            "estimatefee": lambda r: ok(r, 0.00002),
            "getrawtransaction": lambda r: ok(r, "0200"),
            "getblock": lambda r: ok(r, "00ff"),
        }
    )
    assert rpc.kind == "btcd"
    assert rpc.kind == "btcd"  # detected once
    assert [r["method"] for r in fake.requests] == ["getnetworkinfo", "version"]

    assert rpc.generate_to_address(2, "bcrt1qminer") == ["aa", "bb"]
    assert fake.requests[-1]["method"] == "generate"
    assert fake.requests[-1]["params"] == [2]
    with pytest.raises(Unsupported, match="miningaddr"):
        rpc.generate_to_address(1, "bcrt1qsomeoneelse")

    entry = rpc.test_mempool_accept("00aa")
    assert fake.requests[-1]["params"] == [["00aa"], 0.1]
    assert entry["allowed"] is False  # btcd omits it when rejecting

    assert rpc.estimate_fee_rate_sat_vb(3) == pytest.approx(2.0)
    assert fake.requests[-1]["method"] == "estimatefee"

    assert rpc.get_raw_transaction("ab" * 32, block_hash="cd" * 32) == b"\x02\x00"
    assert fake.requests[-1]["params"] == ["ab" * 32, 0]  # btcd: int verbose, no blockhash

    assert rpc.get_block_raw("ef" * 32) == b"\x00\xff"
    assert fake.requests[-1]["params"] == ["ef" * 32, 0]


def test_btcd_without_estimate(fake: FakeNode, rpc: NodeRpc) -> None:
    answers = iter([ok, err])

    def estimatefee(r: dict[str, Any]) -> Reply:
        if next(answers) is ok:
            return ok(r, 0)  # btcd: "no data yet"
        return err(r, -32600, "Invalid request: malformed")  # target it does not track

    fake.responder = by_method({**BTCD_KIND, "estimatefee": estimatefee})
    assert rpc.estimate_fee_rate_sat_vb(2) is None
    assert rpc.estimate_fee_rate_sat_vb(500) is None


def test_core_dialect(fake: FakeNode) -> None:
    fake.responder = by_method(
        {
            **CORE_KIND,
            "generatetoaddress": lambda r: ok(r, ["cc"]),
            "estimatesmartfee": lambda r: ok(r, {"feerate": 0.00012, "blocks": 2}),
            "getrawtransaction": lambda r: ok(r, "01"),
        }
    )
    rpc = NodeRpc(fake.url, "u", "p")  # Core needs no mining address
    assert rpc.kind == "core"
    assert rpc.generate_to_address(1, "bcrt1qany") == ["cc"]
    assert fake.requests[-1]["params"] == [1, "bcrt1qany"]
    assert rpc.estimate_fee_rate_sat_vb(2) == pytest.approx(12.0)
    assert fake.requests[-1]["params"] == [2]
    assert rpc.get_raw_transaction("ab" * 32, block_hash="cd" * 32) == b"\x01"
    assert fake.requests[-1]["params"] == ["ab" * 32, 0, "cd" * 32]
    rpc.close()


def test_core_without_estimate(fake: FakeNode) -> None:
    fake.responder = by_method(
        {
            **CORE_KIND,
            "estimatesmartfee": lambda r: ok(r, {"errors": ["Insufficient data"], "blocks": 0}),
        }
    )
    rpc = NodeRpc(fake.url, "u", "p")
    assert rpc.estimate_fee_rate_sat_vb(2) is None
    rpc.close()


def test_unknown_node_kind_is_unsupported(fake: FakeNode, rpc: NodeRpc) -> None:
    fake.responder = by_method(
        {
            "getnetworkinfo": lambda r: err(r, -32601, "Method not found"),
            "version": lambda r: ok(r, {"something": {}}),
        }
    )
    with pytest.raises(Unsupported):
        _ = rpc.kind


def test_get_tx_out_adds_exact_satoshis(fake: FakeNode, rpc: NodeRpc) -> None:
    # 0.29 * 1e8 == 28999999.999999996 in floats: a naive int() loses a satoshi.
    fake.responder = lambda req: ok(req, {"value": 0.29, "confirmations": 1})
    out = rpc.get_tx_out("ab" * 32, 0)
    assert out is not None
    assert out["value_sat"] == 29_000_000
    assert fake.requests[-1]["params"] == ["ab" * 32, 0, True]
    fake.responder = lambda req: ok(req, None)
    assert rpc.get_tx_out("ab" * 32, 0, include_mempool=False) is None
    assert fake.requests[-1]["params"] == ["ab" * 32, 0, False]


def test_btcd_side_chain_header_falls_back_to_raw_block(fake: FakeNode, rpc: NodeRpc) -> None:
    prev = bytes(range(32))
    merkle = bytes(range(32, 64))
    header = (
        (0x20000000).to_bytes(4, "little")
        + prev
        + merkle
        + (1_700_000_000).to_bytes(4, "little")
        + bytes.fromhex("ffff7f20")
        + (7).to_bytes(4, "little")
    )
    fake.responder = by_method(
        {
            "getblockheader": lambda r: err(r, -32603, "block xx is not in the main chain"),
            "getblock": lambda r: ok(r, (header + b"\x01").hex()),
        }
    )
    info = rpc.get_block_header("11" * 32)
    assert info["confirmations"] == -1
    assert info["hash"] == "11" * 32
    assert info["previousblockhash"] == prev[::-1].hex()
    assert info["merkleroot"] == merkle[::-1].hex()
    assert info["bits"] == "207fffff"
    assert info["time"] == 1_700_000_000
    assert info["nonce"] == 7
    assert fake.requests[-1]["params"] == ["11" * 32, 0]


@pytest.mark.parametrize(
    ("btc", "sats"),
    [
        (0.29, 29_000_000),
        (50.0, 5_000_000_000),
        (0.00000001, 1),
        (21e6, 21 * 10**14),
        ("1.5", 150_000_000),
    ],
)
def test_btc_to_sat(btc: float | str, sats: int) -> None:
    assert btc_to_sat(btc) == sats


def test_btc_to_sat_refuses_sub_satoshi() -> None:
    with pytest.raises(InvalidInput):
        btc_to_sat("0.000000001")
