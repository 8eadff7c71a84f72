"""Fetching blocks: binary over REST where the node serves it (Bitcoin Core), `getblock`
hex where it does not (btcd), hashes in one batch, and the feed that fetches ahead.

A tiny HTTP server on 127.0.0.1 plays the node: it answers JSON-RPC (single and batched)
and, as configured, the REST path the way Core with `-rest=1` does, as Core without it
does (404), as btcd does (hangs up on a GET), or wrongly (another block). The real btcd
exercises the RPC fallback in every watcher test."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import pytest

from custody.chain.feed import HASH_BATCH, BlockFeed
from custody.chain.rpc import NodeRpc, RpcBlockNotFound, RpcInvalidParams, RpcUnavailable
from custody.config import Settings
from custody.db.session import make_engine
from custody.root import Root

RestMode = Literal["core", "rest_off", "btcd", "wrong_block", "warming_up"]


def make_chain(length: int) -> list[bytes]:
    """`length` tiny blocks, each header naming the previous block's hash."""
    blocks: list[bytes] = []
    prev = b"\x00" * 32
    for height in range(length):
        header = (
            (0x20000000).to_bytes(4, "little")
            + prev
            + hashlib.sha256(b"merkle %d" % height).digest()
            + (1_700_000_000 + height).to_bytes(4, "little")
            + bytes.fromhex("207fffff")
            + height.to_bytes(4, "little")
        )
        blocks.append(header + b"\x01" + b"coinbase %d" % height)
        prev = _hash(header)
    return blocks


def _hash(header: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(header[:80]).digest()).digest()


def block_hash(raw: bytes) -> str:
    return _hash(raw)[::-1].hex()


@dataclass
class NodeDouble:
    """Blocks by height; what was asked, in order."""

    blocks: list[bytes]
    rest: RestMode = "core"
    failing_height: int | None = None
    posts: list[Any] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)
    hold_gets: threading.Event | None = None  # set: GETs wait for it (a slow node)

    def __post_init__(self) -> None:
        self.by_hash = {block_hash(raw): (height, raw) for height, raw in enumerate(self.blocks)}
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                double.posts.append(body)
                replies = [double.answer(r) for r in body] if isinstance(body, list) else None
                self.reply(200, json.dumps(replies or double.answer(body)).encode())

            def do_GET(self) -> None:
                double.gets.append(self.path)
                if double.hold_gets is not None:
                    double.hold_gets.wait(10)
                if double.rest == "btcd":
                    self.close_connection = True  # btcd: no answer to a GET
                    return
                if double.rest == "warming_up":
                    self.reply(503, b"Loading block index...", "text/plain")
                    return
                found = re.fullmatch(r"/rest/block/([0-9a-f]{64})\.bin", self.path)
                if double.rest == "rest_off" or found is None:
                    self.reply(404, b"Not found", "text/html")
                    return
                entry = double.by_hash.get(found.group(1))
                if entry is None:
                    self.reply(404, f"{found.group(1)} not found".encode(), "text/plain")
                    return
                raw = entry[1] if double.rest == "core" else double.blocks[entry[0] - 1]
                self.reply(200, raw, "application/octet-stream")

            def reply(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out and hung up

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        method, params = request["method"], request["params"]
        result: Any = None
        error: dict[str, Any] | None = None
        if method == "getblockhash":
            if 0 <= params[0] < len(self.blocks):
                result = block_hash(self.blocks[params[0]])
            else:
                error = {"code": -8, "message": "Block height out of range"}
        elif method == "getblock" and params[0] in self.by_hash:
            height, raw = self.by_hash[params[0]]
            if height == self.failing_height:
                error = {"code": -1, "message": "database is broken"}
            else:
                result = raw.hex()
        else:
            error = {"code": -5, "message": "Block not found"}
        return {"result": result, "error": error, "id": request["id"]}

    def getblock_calls(self) -> int:
        return sum(1 for p in self.posts if isinstance(p, dict) and p["method"] == "getblock")

    def close(self) -> None:
        if self.hold_gets is not None:
            self.hold_gets.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def chain() -> list[bytes]:
    return make_chain(80)


@pytest.fixture
def double(chain: list[bytes]) -> Iterator[NodeDouble]:
    node = NodeDouble(chain)
    yield node
    node.close()


@pytest.fixture
def rpc(double: NodeDouble) -> Iterator[NodeRpc]:
    client = NodeRpc(double.url, "alice", "s3cret-pass-word", timeout=5.0)
    yield client
    client.close()


def test_core_with_rest_serves_binary_blocks(
    double: NodeDouble, rpc: NodeRpc, chain: list[bytes]
) -> None:
    assert rpc.serves_rest is None  # not asked yet
    for height in (3, 4, 9):
        assert rpc.get_block_raw(block_hash(chain[height])) == chain[height]
    assert rpc.serves_rest is True
    assert double.gets == [f"/rest/block/{block_hash(chain[h])}.bin" for h in (3, 4, 9)]
    assert double.getblock_calls() == 0  # no hex, no JSON


@pytest.mark.parametrize("mode", ["rest_off", "btcd"])
def test_without_rest_getblock_is_used_and_rest_is_asked_once(
    double: NodeDouble, rpc: NodeRpc, chain: list[bytes], mode: RestMode
) -> None:
    """Core without `-rest` answers 404, btcd hangs up: both fall back to `getblock`,
    and the node is not asked about REST again."""
    double.rest = mode
    for height in (1, 2, 3):
        assert rpc.get_block_raw(block_hash(chain[height])) == chain[height]
    assert rpc.serves_rest is False
    assert len(double.gets) == 1
    assert double.getblock_calls() == 3


def test_a_node_warming_up_is_asked_about_rest_again(
    double: NodeDouble, rpc: NodeRpc, chain: list[bytes]
) -> None:
    """Core answers 503 while it loads its block index: that says nothing about REST."""
    double.rest = "warming_up"
    assert rpc.get_block_raw(block_hash(chain[1])) == chain[1]  # over RPC this time
    assert rpc.serves_rest is None and double.getblock_calls() == 1
    double.rest = "core"
    assert rpc.get_block_raw(block_hash(chain[2])) == chain[2]
    assert rpc.serves_rest is True and double.getblock_calls() == 1


def test_a_rest_block_must_be_the_block_asked_for(
    double: NodeDouble, rpc: NodeRpc, chain: list[bytes]
) -> None:
    double.rest = "wrong_block"
    with pytest.raises(RpcUnavailable, match="another block"):
        rpc.get_block_raw(block_hash(chain[5]))
    assert double.getblock_calls() == 0  # a node that lies is not asked again another way


def test_an_unknown_block_over_rest_is_not_found(
    double: NodeDouble, rpc: NodeRpc, chain: list[bytes]
) -> None:
    assert rpc.get_block_raw(block_hash(chain[1])) == chain[1]
    with pytest.raises(RpcBlockNotFound):
        rpc.get_block_raw("ab" * 32)
    assert rpc.serves_rest is True


def test_rest_keeps_the_clients_timeout_and_decides_nothing_on_it(
    chain: list[bytes],
) -> None:
    double = NodeDouble(chain, hold_gets=threading.Event())
    rpc = NodeRpc(double.url, "alice", "pw", timeout=0.3)
    try:
        with pytest.raises(RpcUnavailable, match="timed out"):
            rpc.get_block_raw(block_hash(chain[2]))
        assert rpc.serves_rest is None  # a slow node is not a node without REST
        assert double.hold_gets is not None
        double.hold_gets.set()
        assert rpc.get_block_raw(block_hash(chain[2])) == chain[2]
        assert rpc.serves_rest is True
    finally:
        rpc.close()
        double.close()


def test_rest_is_asked_of_a_remote_node_only_when_configured() -> None:
    """REST has no authentication: by default only a node on this machine is asked."""
    assert NodeRpc("http://192.0.2.7:8332", "u", "p").serves_rest is False
    assert NodeRpc("http://bitcoind:8332", "u", "p").serves_rest is False
    assert NodeRpc("http://[::1]:8332", "u", "p").serves_rest is None
    assert NodeRpc("http://localhost:8332", "u", "p").serves_rest is None
    assert NodeRpc("http://bitcoind:8332", "u", "p", rest=True).serves_rest is None
    assert NodeRpc("http://127.0.0.1:8332", "u", "p", rest=False).serves_rest is False


def test_the_setting_reaches_the_node_client() -> None:
    for value, allowed in (("auto", False), ("on", True), ("off", False)):
        settings = Settings(node_rpc_url="http://bitcoind:8332", node_rest=value)
        root = Root.assemble(settings, engine=make_engine("sqlite://"))
        try:
            assert (root.node.serves_rest is None) == allowed
        finally:
            root.close()


def test_block_hashes_come_in_one_batched_request(
    double: NodeDouble, rpc: NodeRpc, chain: list[bytes]
) -> None:
    assert rpc.get_block_hashes(range(10, 15)) == [block_hash(chain[h]) for h in range(10, 15)]
    [batch] = double.posts
    assert isinstance(batch, list) and [r["params"] for r in batch] == [[h] for h in range(10, 15)]
    assert len({r["id"] for r in batch}) == 5
    assert rpc.get_block_hashes([]) == []
    with pytest.raises(RpcInvalidParams, match="out of range"):
        rpc.get_block_hashes([78, 79, 80])


def test_the_feed_yields_every_block_in_height_order(
    double: NodeDouble, rpc: NodeRpc, chain: list[bytes]
) -> None:
    with BlockFeed(rpc, 1, 75, depth=3) as feed:
        got = list(feed)
    assert got == [(h, chain[h]) for h in range(1, 76)]
    batches = [p for p in double.posts if isinstance(p, list)]
    assert len(batches) == -(-75 // HASH_BATCH)  # ceil: one batch of hashes per 32 heights
    assert len(double.gets) == 75


def test_the_feed_raises_the_nodes_error_where_it_happened(
    double: NodeDouble, rpc: NodeRpc, chain: list[bytes]
) -> None:
    double.rest, double.failing_height = "btcd", 6
    heights: list[int] = []
    with pytest.raises(Exception, match="database is broken"), BlockFeed(rpc, 2, 20) as feed:
        for height, raw in feed:
            assert raw == chain[height]
            heights.append(height)
    assert heights == [2, 3, 4, 5]


def test_leaving_the_feed_stops_its_thread(double: NodeDouble, rpc: NodeRpc) -> None:
    with BlockFeed(rpc, 1, 79, depth=2) as feed:
        for height, _ in feed:
            assert height == 1
            break
    assert not feed._thread.is_alive()
    # The block in hand, the ones waiting, the one being fetched: never the whole range.
    assert len(double.gets) <= 2 + 2
