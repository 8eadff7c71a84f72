"""The signer's own node client (hsm.node.NodeReader).

Node tests run against the real btcd of the regtest fixture (with ``--addrindex``);
the Bitcoin Core path can only be checked against a fake JSON-RPC server here.
The node is shared by the worker's tests: every test makes its own payments to
fresh scripts and reads heights relative to the tip it saw.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from embit.script import address_to_scriptpubkey

from hsm.node import NodeReader, NodeRpcError, UnspentOutput, btc_to_sats
from hsm.signer import SignerUnavailable
from regtest.faucet import Coin, Faucet, random_p2wpkh_address, random_p2wsh_multisig
from regtest.node import RegtestNode, free_port

SPEND_FEE = 5_000


@pytest.fixture
def reader(regtest_node: RegtestNode) -> Iterator[NodeReader]:
    with NodeReader(
        regtest_node.rpc_url, regtest_node.rpc_user, regtest_node.rpc_password
    ) as node_reader:
        yield node_reader


def _spk(address: str) -> bytes:
    data: bytes = address_to_scriptpubkey(address).data
    return data


def _spend(owner: Faucet, coin: Coin) -> str:
    """Spend ``coin`` (paying ``owner``'s key) to a sink, with no change back to ``owner``."""
    payment = owner.build_tx(
        [(random_p2wpkh_address(), coin.value_sat - SPEND_FEE)],
        spend=[coin],
        min_fee_sat=SPEND_FEE,
    )
    assert payment.change_vout is None
    return owner.rpc.send_raw_transaction(payment.tx_hex)


# -- against btcd --------------------------------------------------------------------


@pytest.mark.node
def test_tip_height_and_kind(regtest_node: RegtestNode, reader: NodeReader) -> None:
    assert reader.kind() == "btcd"
    assert reader.tip_height() == regtest_node.rpc.get_block_count()
    before = reader.tip_height()
    regtest_node.mine(1)
    assert reader.tip_height() == before + 1
    assert reader.kind() == "btcd"  # cached, still right


@pytest.mark.node
def test_tx_out_follows_a_payment_until_a_block_spends_it(
    regtest_node: RegtestNode, reader: NodeReader
) -> None:
    owner = Faucet(regtest_node.rpc)
    txid, vout = regtest_node.faucet.pay(owner.address, 12_345)

    in_mempool = reader.tx_out(txid, vout)
    assert in_mempool == UnspentOutput(txid, vout, 12_345, owner.script_pubkey.data, 0)

    regtest_node.mine(1)
    mined = reader.tx_out(txid, vout)
    assert mined is not None and mined.confirmations == 1
    regtest_node.mine(1)
    deeper = reader.tx_out(txid, vout)
    assert deeper is not None and deeper.confirmations == 2

    spend = _spend(owner, Coin(txid, vout, 12_345))
    # Spent only in the mempool: still the chain's unspent output (a fee bump must
    # be able to spend it again).
    assert reader.tx_out(txid, vout) == UnspentOutput(
        txid, vout, 12_345, owner.script_pubkey.data, 2
    )
    regtest_node.mine(1)
    assert reader.transaction_confirmations(spend) == 1
    assert reader.tx_out(txid, vout) is None


@pytest.mark.node
def test_tx_out_of_an_unknown_outpoint_is_none(
    regtest_node: RegtestNode, reader: NodeReader
) -> None:
    assert reader.tx_out("ab" * 32, 0) is None
    txid, _ = regtest_node.faucet.pay(random_p2wpkh_address(), 10_000)
    assert reader.tx_out(txid, 7) is None  # the tx exists, that output does not


@pytest.mark.node
@pytest.mark.parametrize("page_size", [100, 1], ids=["one-page", "paged"])
def test_unspent_for_scripts_finds_exactly_the_loans_outputs(
    regtest_node: RegtestNode, reader: NodeReader, page_size: int
) -> None:
    reader.search_page_size = page_size
    owner = Faucet(regtest_node.rpc)  # holds the key of watched script A
    script_a = owner.script_pubkey.data
    address_b, _, _ = random_p2wsh_multisig()  # watched script B, like a loan's wsh
    script_b = _spk(address_b)
    other = random_p2wpkh_address()
    faucet = regtest_node.faucet

    tx1 = faucet.pay_many(
        [(owner.address, 10_000), (owner.address, 20_000), (address_b, 30_000), (other, 40_000)]
    )
    tx2, _ = faucet.pay(address_b, 50_000)
    _spend(owner, Coin(tx1, 1, 20_000))  # A's second output of tx1: spent in a block
    regtest_node.mine(1)
    # Several mempool transactions on A: btcd lists them in random order on each call.
    tx3 = [faucet.pay(owner.address, 60_000 + i)[0] for i in range(4)]
    _spend(owner, Coin(tx1, 0, 10_000))  # spent in the mempool only: still listed

    expected = sorted(
        [
            UnspentOutput(tx1, 0, 10_000, script_a, 1),
            UnspentOutput(tx1, 2, 30_000, script_b, 1),
            UnspentOutput(tx2, 0, 50_000, script_b, 1),
            *(UnspentOutput(txid, 0, 60_000 + i, script_a, 0) for i, txid in enumerate(tx3)),
        ],
        key=lambda o: (o.txid, o.vout),
    )
    for _ in range(3):  # the mempool order changes per call: a paging bug shows up here
        found = reader.unspent_for_scripts([script_a, script_b, script_a], network="regtest")
        assert sorted(found, key=lambda o: (o.txid, o.vout)) == expected
        assert len(found) == len({(o.txid, o.vout) for o in found})  # no duplicates

    only_b = reader.unspent_for_scripts([script_b], network="regtest")
    assert {(o.txid, o.vout) for o in only_b} == {(tx1, 2), (tx2, 0)}
    assert reader.unspent_for_scripts([], network="regtest") == []


@pytest.mark.node
def test_a_script_without_history(regtest_node: RegtestNode, reader: NodeReader) -> None:
    fresh = _spk(random_p2wpkh_address())
    assert reader.unspent_for_scripts([fresh], network="regtest") == []
    assert reader.has_history(fresh, network="regtest") is False


@pytest.mark.node
def test_has_history_sees_a_payment_and_keeps_seeing_it_once_spent(
    regtest_node: RegtestNode, reader: NodeReader
) -> None:
    owner = Faucet(regtest_node.rpc)
    script = owner.script_pubkey.data
    assert reader.has_history(script, network="regtest") is False
    txid, vout = regtest_node.faucet.pay(owner.address, 25_000)
    assert reader.has_history(script, network="regtest") is True  # mempool counts
    regtest_node.mine(1)
    _spend(owner, Coin(txid, vout, 25_000))
    regtest_node.mine(1)
    assert reader.unspent_for_scripts([script], network="regtest") == []
    assert reader.has_history(script, network="regtest") is True  # used, then emptied


@pytest.mark.node
def test_transaction_confirmations(regtest_node: RegtestNode, reader: NodeReader) -> None:
    assert reader.transaction_confirmations("cd" * 32) is None
    txid, _ = regtest_node.faucet.pay(random_p2wpkh_address(), 15_000)
    assert reader.transaction_confirmations(txid) == 0
    regtest_node.mine(1)
    assert reader.transaction_confirmations(txid) == 1
    regtest_node.mine(2)
    assert reader.transaction_confirmations(txid) == 3


@pytest.mark.node
def test_a_batch_answers_each_call_in_order_with_its_own_error(
    regtest_node: RegtestNode, reader: NodeReader
) -> None:
    txid, vout = regtest_node.faucet.pay(random_p2wpkh_address(), 11_000)
    tip = regtest_node.rpc.get_block_count()
    results = reader._batch(
        [
            ("getblockcount", ()),
            ("gettxout", (txid, vout, True)),
            ("nosuchmethod", ()),
            ("gettxout", ("ab" * 32, 0, True)),
            ("getblockcount", ()),
        ]
    )
    assert results[0] == results[4] == tip
    assert btc_to_sats(results[1]["value"]) == 11_000
    assert isinstance(results[2], NodeRpcError) and results[2].method == "nosuchmethod"
    assert results[3] is None  # btcd: null for an unknown outpoint
    assert reader._batch([]) == []


@pytest.mark.node
def test_a_loans_scan_is_two_round_trips_to_btcd(
    regtest_node: RegtestNode, reader: NodeReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """btcd closes its connection after each reply: the scan of six scripts, two of them
    paid, is one batch for the tip and history and one for the outputs (and the tip again,
    which says the answer holds at one block), not ten calls."""
    owners = [Faucet(regtest_node.rpc) for _ in range(2)]
    paid = [regtest_node.faucet.pay(o.address, 21_000 + i) for i, o in enumerate(owners)]
    regtest_node.mine(1)
    scripts = [o.script_pubkey.data for o in owners] + [
        _spk(random_p2wpkh_address()) for _ in range(4)
    ]
    reader.kind()
    posts: list[Any] = []
    post = reader._post

    def counted(payload: Any, method: str, timeout: float | None) -> tuple[Any, int]:
        posts.append(payload)
        return post(payload, method, timeout)

    monkeypatch.setattr(reader, "_post", counted)
    found, tip = reader.unspent_at_tip(scripts, network="regtest")
    assert sorted((o.txid, o.vout) for o in found) == sorted(paid)
    assert [len(p) for p in posts] == [8, 3]  # tip, 6 pages, tip; then 2 gettxout, tip
    assert tip == regtest_node.rpc.call("getbestblockhash")


@pytest.mark.node
def test_a_scan_names_its_tip_only_if_the_tip_held_throughout(
    regtest_node: RegtestNode, reader: NodeReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signer reuses a scan only at the tip it names: a block found between the
    history batch and the gettxout batch leaves it unnamed (None), so nothing reuses it."""
    owner = Faucet(regtest_node.rpc)
    regtest_node.faucet.pay(owner.address, 33_000)
    regtest_node.mine(1)
    script = owner.script_pubkey.data
    found, tip = reader.unspent_at_tip([script], network="regtest")
    assert len(found) == 1 and tip == regtest_node.rpc.call("getbestblockhash")
    outs, at = reader.tx_outs_at_tip([])
    assert outs == [] and at == tip

    batch = reader._batch
    batches: list[int] = []

    def a_block_after_the_history(calls: Any) -> list[Any]:
        replies = batch(calls)
        batches.append(len(calls))
        if len(batches) == 1:
            regtest_node.mine(1)
        return replies

    monkeypatch.setattr(reader, "_batch", a_block_after_the_history)
    found, tip = reader.unspent_at_tip([script], network="regtest")
    assert len(found) == 1 and found[0].confirmations == 2
    assert tip is None
    assert batches == [3, 2]


@pytest.mark.node
def test_a_wrong_password_is_unavailable_and_never_echoed(regtest_node: RegtestNode) -> None:
    wrong = "not-the-password-" + regtest_node.rpc_password[:8]
    with NodeReader(regtest_node.rpc_url, regtest_node.rpc_user, wrong) as bad:
        with pytest.raises(SignerUnavailable, match="the signer's node") as caught:
            bad.tip_height()
        assert "credentials" in str(caught.value)
        for text in (str(caught.value), repr(caught.value), repr(bad)):
            assert wrong not in text
            assert regtest_node.rpc_password not in text


@pytest.mark.node
def test_an_unexpected_rpc_error_is_unavailable(
    regtest_node: RegtestNode, reader: NodeReader
) -> None:
    with pytest.raises(NodeRpcError) as caught:
        reader._call("nosuchmethod")
    assert isinstance(caught.value, SignerUnavailable)
    assert caught.value.rpc_code != 0


# -- pure ------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "sats"),
    [
        (0.00000001, 1),
        (Decimal("0.00000001"), 1),
        ("0.00000001", 1),
        (1e-08, 1),
        (21e6, 2_100_000_000_000_000),
        (21_000_000, 2_100_000_000_000_000),
        (1.23456789, 123_456_789),
        (Decimal("20999999.99999999"), 2_099_999_999_999_999),
        (0.1, 10_000_000),
        (0.29, 29_000_000),  # 0.29 * 1e8 == 28999999.999999996 in float math
        (1.15, 115_000_000),  # 1.15 * 1e8 == 114999999.99999999
        (0, 0),
        (50, 5_000_000_000),
    ],
)
def test_btc_to_sats_is_exact(value: Decimal | float | int | str, sats: int) -> None:
    assert btc_to_sats(value) == sats


@pytest.mark.unit
@pytest.mark.parametrize(
    "value",
    [0.000000001, Decimal("1.000000005"), -1, 21_000_001, "nan", float("inf"), "abc", True],
)
def test_btc_to_sats_refuses_nonsense(value: Any) -> None:
    with pytest.raises(ValueError):
        btc_to_sats(value)


@pytest.mark.unit
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:18443",
        "http://127.8.9.10:18443",
        "http://[::1]:18443",
        "http://localhost:18443",
        "https://node.bank.example:8332",
        "https://10.1.2.3:8332",
    ],
)
def test_loopback_http_and_any_https_are_accepted(url: str) -> None:
    with NodeReader(url, "user", "pw") as node_reader:
        assert node_reader.url == url


@pytest.mark.unit
@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5:8332",
        "http://192.168.1.10:8332",
        "http://node.bank.example:8332",
        "http://0.0.0.0:8332",
        "ftp://127.0.0.1:8332",
        "127.0.0.1:8332",
        "https://",
        "",
    ],
)
def test_other_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        NodeReader(url, "user", "pw")


@pytest.mark.unit
def test_credentials_in_the_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(ValueError) as caught:
        NodeReader("http://user:hunter2-secret@127.0.0.1:8332", "user", "pw")
    assert "hunter2-secret" not in str(caught.value)


@pytest.mark.unit
def test_nothing_listening_is_unavailable() -> None:
    password = "closed-port-password"
    url = f"http://127.0.0.1:{free_port()}"
    with (
        NodeReader(url, "u", password) as node_reader,
        pytest.raises(SignerUnavailable, match="unreachable") as caught,
    ):
        node_reader.tip_height()
    assert password not in str(caught.value)


@pytest.mark.unit
def test_a_silent_node_times_out_as_unavailable() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # accepts the connection (backlog), never answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        with (
            NodeReader(url, "u", "pw", timeout=0.3) as node_reader,
            pytest.raises(SignerUnavailable, match="in time"),
        ):
            node_reader.tip_height()


# -- the Bitcoin Core path, against a fake server ---------------------------------------

Responder = Callable[[str, list[Any]], Any]


class FakeCore:
    """Answers like Bitcoin Core (errors as HTTP 404/500 with a JSON body); records requests."""

    def __init__(self, responder: Responder) -> None:
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(request)
                try:
                    status, body = (
                        200,
                        {"result": responder(request["method"], request["params"]), "error": None},
                    )
                except LookupError:
                    status, body = (
                        404,
                        {"result": None, "error": {"code": -32601, "message": "Method not found"}},
                    )
                body["id"] = request["id"]
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeCore:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.unit
def test_core_path_scans_the_utxo_set_and_checks_each_output() -> None:
    script_a, script_b = bytes.fromhex("0014" + "11" * 20), bytes.fromhex("0020" + "22" * 32)
    txid_a, txid_b, txid_spent, txid_mempool_spent = "aa" * 32, "bb" * 32, "cc" * 32, "dd" * 32
    outputs = {
        (txid_a, 0): ("20999999.99999999", script_a, 6),
        (txid_b, 3): ("0.29", script_b, 1),  # 0.29 * 1e8 is not 29000000 in floats
        (txid_mempool_spent, 2): ("0.5", script_a, 3),
    }

    def responder(method: str, params: list[Any]) -> Any:
        if method == "getnetworkinfo":
            return {"subversion": "/Satoshi:27.0.0/"}
        if method == "scantxoutset":
            return {
                "success": True,
                "height": 200,
                "unspents": [
                    {"txid": txid_a, "vout": 0, "height": 195},
                    {"txid": txid_b, "vout": 3, "height": 200},
                    {"txid": txid_spent, "vout": 1, "height": 190},  # spent since the scan
                    {"txid": txid_mempool_spent, "vout": 2, "height": 198},
                ],
            }
        if method == "gettxout":
            entry = outputs.get((params[0], params[1]))
            if entry is None or (params[2] and params[0] == txid_mempool_spent):
                return None  # Core hides mempool-spent outputs when asked with the mempool
            value, spk, conf = entry
            # A float: json writes its shortest repr, i.e. exactly the node's text.
            return {
                "value": float(value),
                "confirmations": conf,
                "scriptPubKey": {"hex": spk.hex()},
            }
        raise LookupError(method)

    with FakeCore(responder) as fake, NodeReader(fake.url, "u", "pw") as node_reader:
        found = node_reader.unspent_for_scripts([script_a, script_b], network="regtest")
        assert node_reader.kind() == "core"

    assert found == [
        UnspentOutput(txid_a, 0, 2_099_999_999_999_999, script_a, 6),
        UnspentOutput(txid_b, 3, 29_000_000, script_b, 1),
        UnspentOutput(txid_mempool_spent, 2, 50_000_000, script_a, 3),
    ]
    asked = [r["params"] for r in fake.requests if r["method"] == "gettxout"]
    assert [txid_mempool_spent, 2, True] in asked and [txid_mempool_spent, 2, False] in asked
    scans = [r for r in fake.requests if r["method"] == "scantxoutset"]
    assert [s["params"] for s in scans] == [
        ["start", [{"desc": f"raw({script_a.hex()})"}, {"desc": f"raw({script_b.hex()})"}]]
    ]
    for request in fake.requests:
        assert request["jsonrpc"] == "1.0"
        assert isinstance(request["id"], int) and not isinstance(request["id"], bool)
        assert isinstance(request["params"], list)
    assert len({r["id"] for r in fake.requests}) == len(fake.requests)
    assert [r["method"] for r in fake.requests].count("getnetworkinfo") == 1  # kind is cached


def _batch_server(answer: Callable[[list[dict[str, Any]]], Any]) -> FakeCore:
    """A fake node whose replies to a batch are ``answer(requests)``."""
    fake = FakeCore(lambda method, params: None)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps(answer(request)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    fake.server.RequestHandlerClass = Handler
    return fake


def _ok(request: dict[str, Any], id_: Any = None) -> dict[str, Any]:
    return {"result": 7, "error": None, "id": request["id"] if id_ is None else id_}


@pytest.mark.unit
@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda reqs: [_ok(r) for r in reqs[:-1]], id="a-reply-missing"),
        pytest.param(lambda reqs: [_ok(reqs[0]), _ok(reqs[0])], id="an-id-twice"),
        pytest.param(lambda reqs: [_ok(reqs[0]), _ok(reqs[1], 999_999)], id="a-foreign-id"),
        pytest.param(lambda reqs: _ok(reqs[0]), id="not-a-list"),
        pytest.param(lambda reqs: [_ok(reqs[0]), {"id": reqs[1]["id"]}], id="no-result"),
        pytest.param(lambda reqs: [_ok(reqs[0]), "x"], id="not-an-object"),
    ],
)
def test_a_malformed_batch_reply_is_unavailable(answer: Callable[[Any], Any]) -> None:
    with (
        _batch_server(answer) as fake,
        NodeReader(fake.url, "u", "pw") as node_reader,
        pytest.raises(SignerUnavailable) as caught,
    ):
        node_reader._batch([("getblockcount", ()), ("getblockcount", ())])
    assert not isinstance(caught.value, NodeRpcError)


@pytest.mark.unit
def test_batch_replies_in_another_order_are_matched_by_id() -> None:
    def answer(reqs: list[dict[str, Any]]) -> Any:
        return [{"result": r["params"][0], "error": None, "id": r["id"]} for r in reqs[::-1]]

    with _batch_server(answer) as fake, NodeReader(fake.url, "u", "pw") as node_reader:
        assert node_reader._batch([("echo", ("a",)), ("echo", ("b",)), ("echo", ("c",))]) == [
            "a",
            "b",
            "c",
        ]
