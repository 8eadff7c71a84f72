"""A minimal asyncio HTTP/1.1 keep-alive client, for the load benchmark's open loop.

Why not httpx: on this 2-core machine httpx.AsyncClient spends about 2 ms of CPU per
request (measured against a trivial uvicorn endpoint: 1.9-2.3 ms/request), this client
0.4 ms. At 200-400 requests/s httpx alone would take most of a core from the servers it
measures, and fell behind its own schedule at 200 requests/s (p99 lag ~190 ms) where this
one kept to it. `python -m bench load --http httpx` still measures with httpx.

Enough HTTP for our own server on loopback: requests with no body, answers framed by
Content-Length or chunked, `Connection: close` honoured, idle connections reused (most
recent first) and dropped before the server's keep-alive timeout (uvicorn: 5 s).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

IDLE_SECONDS = 2.0  # reuse a connection idle at most this long (uvicorn closes at 5 s)

_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class ProtocolError(ValueError):
    """The server's answer was not HTTP/1.1 as this client reads it."""


class Connections:
    """Keep-alive connections per (host, port); one request at a time on each."""

    def __init__(self) -> None:
        self._idle: defaultdict[tuple[str, int], list[tuple[float, _Stream]]] = defaultdict(list)

    async def request(
        self, host: str, port: int, method: str, path: str, headers: dict[str, str]
    ) -> int:
        """Send one request and read its whole answer; the status code. A reused
        connection the server had already closed is retried once on a new one."""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            + "Content-Length: 0\r\n\r\n"
        ).encode("latin-1")
        for attempt in (1, 2):
            stream, reused = await self._take(host, port)
            reader, writer = stream
            try:
                writer.write(head)
                status, close = await _read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                writer.close()
                nothing_read = not getattr(exc, "partial", b"")
                if reused and nothing_read and attempt == 1:
                    continue
                raise
            except BaseException:  # cancelled (timed out) mid-answer: the stream is unusable
                writer.close()
                raise
            if close:
                writer.close()
            else:
                self._idle[(host, port)].append((time.monotonic(), stream))
            return status
        raise AssertionError("unreachable")

    async def _take(self, host: str, port: int) -> tuple[_Stream, bool]:
        idle = self._idle[(host, port)]
        while idle:
            since, stream = idle.pop()
            if time.monotonic() - since <= IDLE_SECONDS and not stream[1].is_closing():
                return stream, True
            stream[1].close()
        return await asyncio.open_connection(host, port), False

    def close(self) -> None:
        for idle in self._idle.values():
            for _, (_, writer) in idle:
                writer.close()
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the server closes the connection), the body read and dropped."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line: {lines[0][:80]!r}")
    status = int(parts[1])
    length: int | None = None
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value
        elif name == "connection":
            close = value == "close"
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:  # (no trailers from our server)
                break
    elif length is not None:
        await reader.readexactly(length)
    elif status >= 200 and status not in (204, 304):
        await reader.read()  # framed by the server closing the connection
        close = True
    return status, close
