"""The service's and the signer's HTTP clients share one verifying TLS context
(`pledge.tls.client_tls`: building one per client cost ~20 ms each, which a watcher's
scanning child paid before its first block). Sharing it must not loosen it: a node behind a
certificate nobody trusts is refused before the request (and its password) is sent."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from support.http_server import answer, local_http_server
from support.tls import Tls, self_signed

from custody.chain.rpc import NodeRpc
from hsm.node import NodeReader
from pledge.tls import client_tls


class _Node(BaseHTTPRequestHandler):
    """A JSON-RPC node that answers every call with a height; keeps what it was sent."""

    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Node.seen.append(str(self.headers.get("Authorization")))
        result = json.dumps({"result": 7, "error": None, "id": body.get("id")}).encode()
        answer(self, 200, result)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    return self_signed(tmp_path, "localhost")


@pytest.fixture
def https_node(tls: Tls) -> Iterator[str]:
    _Node.seen = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert, tls.key)
    with local_http_server(_Node, tls=context, name="localhost") as url:
        yield url


def test_one_context_per_process_and_it_verifies() -> None:
    assert client_tls() is client_tls()
    assert client_tls(trust_env=False) is client_tls(trust_env=False)
    for context in (client_tls(), client_tls(trust_env=False)):
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_a_node_behind_a_certificate_nobody_trusts_is_refused(https_node: str, tls: Tls) -> None:
    rpc = NodeRpc(https_node, "user", "secret-password", timeout=5)
    with pytest.raises(Exception) as service:
        rpc.get_block_count()
    reader = NodeReader(https_node, "user", "secret-password", timeout=5)
    with pytest.raises(Exception) as signer:
        reader.tip_height()
    for refused in (service.value, signer.value):
        causes = f"{refused} {refused.__cause__} {refused.__context__}".lower()
        assert "certificate verify failed" in causes, causes
    assert _Node.seen == []  # no request, no password, reached the server
    # The server itself answers a client told to trust its certificate.
    trusting = ssl.create_default_context(cafile=str(tls.cert))
    with httpx.Client(verify=trusting) as client:
        body = {"jsonrpc": "1.0", "id": 1, "method": "getblockcount", "params": []}
        assert client.post(https_node, json=body).json()["result"] == 7
    assert len(_Node.seen) == 1
