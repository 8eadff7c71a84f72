"""Body limits and the key before the body, against a real `custody serve` (uvicorn on
httptools and uvloop, as deployed), on SQLite and PostgreSQL, through a raw socket: the
client decides how much of its body it has sent when it waits for the answer.

Issue 12 measured an unauthenticated 300 MB POST: 13 s, and the server at 1.2 GB of memory,
because the body was read whole before its key was looked at. Here the answer must come
while the client has sent at most a megabyte of it, and the server's resident memory must
stay flat while the remaining hundreds of megabytes arrive.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from support.custody_serve import ServiceProcess, custody_serve

from custody.api.limits import JSON_BODY_LIMIT, UPLOAD_BODY_LIMIT
from custody.auth.service import create_principal
from custody.db.migrate import upgrade
from custody.db.models import Role
from custody.db.session import make_engine, transaction

pytestmark = [pytest.mark.process]  # starts custody/hsm commands as OS processes

HUGE = 300 * 1024 * 1024
CHUNK = 1024 * 1024
ANSWER_TIMEOUT = 20.0  # seconds the server has to answer; a shared CI machine is slow


@dataclass
class Served:
    server: ServiceProcess
    admin_key: str

    @property
    def address(self) -> tuple[str, int]:
        url = urlsplit(self.server.url)
        assert url.hostname is not None and url.port is not None
        return url.hostname, url.port

    def rss(self) -> int:
        """The server process's resident memory, in bytes."""
        status = Path(f"/proc/{self.server.proc.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One server per backend for the module (none of these requests changes anything)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('limits') / 'db.sqlite'}"
    else:
        server = request.getfixturevalue("postgres_server")
        url = server.create_database(f"limits_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")
    engine = make_engine(url)
    upgrade(engine)
    with transaction(engine) as session:
        _, admin_key = create_principal(
            session, name="limits-admin", role=Role.admin, party_id=None, actor="test"
        )
    engine.dispose()
    with custody_serve(url, tmp_path_factory.mktemp("serve")) as process:
        yield Served(process, admin_key)


def _open(served: Served, method: str, path: str, headers: dict[str, str]) -> socket.socket:
    """A connection with the request line and headers sent, and nothing of the body."""
    sock = socket.create_connection(served.address, timeout=ANSWER_TIMEOUT)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {served.address[0]}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of the response, waiting for it at most ANSWER_TIMEOUT (a
    read with a timeout: the answer itself is the condition waited for)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    header_lines = head.decode().split("\r\n")
    status = int(header_lines[0].split()[1])
    length = next(
        int(line.split(":", 1)[1])
        for line in header_lines
        if line.lower().startswith("content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the answer"
        body += chunk
    answer: dict[str, Any] = json.loads(body[:length])
    return status, answer


def _chunk(size: int) -> bytes:
    """One HTTP/1.1 chunk of `size` spaces."""
    return f"{size:x}\r\n".encode() + b" " * size + b"\r\n"


def _send_the_rest(served: Served, sock: socket.socket, sent: int, total: int = HUGE) -> int:
    """Send the body up to `total` bytes (chunked), sampling the server's memory: the largest
    growth over what it held before. A server that hangs up instead is fine too."""
    before = served.rss()
    growth = 0
    piece = _chunk(CHUNK)
    try:
        while sent < total:
            sock.sendall(piece)
            sent += CHUNK
            if sent % (16 * CHUNK) == 0:
                growth = max(growth, served.rss() - before)
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass
    return max(growth, served.rss() - before)


def test_an_unauthenticated_body_is_answered_before_any_of_it_is_sent(served: Served) -> None:
    started = time.monotonic()
    sock = _open(
        served,
        "POST",
        "/v1/parties",
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    with sock:
        status, body = _answer(sock)
        answered_in = time.monotonic() - started
        assert status == 401, body
        assert body["error"] == "not_authenticated"
        growth = _send_the_rest(served, sock, 0)
        sent_in = time.monotonic() - started
    print(
        f"401 in {answered_in:.3f} s with none of the body sent; the {HUGE >> 20} MiB sent"
        f" after it in {sent_in:.1f} s, server memory +{growth >> 20} MiB"
    )
    assert growth < 64 * 1024 * 1024, f"the server's memory grew {growth >> 20} MiB"
    assert httpx.get(f"{served.server.url}/v1/health", timeout=ANSWER_TIMEOUT).status_code == 200


@pytest.mark.parametrize("key", [False, True])
def test_a_declared_length_over_the_limit_is_refused_before_any_of_it_is_sent(
    served: Served, key: bool
) -> None:
    for path, content_type in (
        ("/v1/parties", "application/json"),
        ("/v1/signing-requests/1/signatures", "application/octet-stream"),
    ):
        headers = {"Content-Type": content_type, "Content-Length": str(HUGE)}
        if key:
            headers["Authorization"] = f"Bearer {served.admin_key}"
        with _open(served, "POST", path, headers) as sock:
            status, body = _answer(sock)
        assert status == 413, (path, body)
        assert body["error"] == "body_too_large"


@pytest.mark.parametrize(
    ("path", "content_type", "limit"),
    [
        ("/v1/parties", "application/json", JSON_BODY_LIMIT),
        ("/v1/signing-requests/1/signatures", "application/octet-stream", UPLOAD_BODY_LIMIT),
    ],
)
def test_a_body_is_refused_as_soon_as_it_passes_the_limit(
    served: Served, path: str, content_type: str, limit: int
) -> None:
    """Chunked, so no length is declared: the server counts what it reads and answers once
    it has read past the limit, with the client waiting, a megabyte past it."""
    headers = {
        "Content-Type": content_type,
        "Transfer-Encoding": "chunked",
        "Authorization": f"Bearer {served.admin_key}",
    }
    with _open(served, "POST", path, headers) as sock:
        sent = 0
        while sent <= limit + CHUNK:
            sock.sendall(_chunk(64 * 1024))
            sent += 64 * 1024
        status, body = _answer(sock)
        assert status == 413, body
        assert body == {
            "error": "body_too_large",
            "message": f"the request body is larger than this route accepts ({limit} bytes)",
            "field": None,
        }
        growth = _send_the_rest(served, sock, sent, 64 * CHUNK)
    assert growth < 64 * 1024 * 1024, f"the server's memory grew {growth >> 20} MiB"
