"""How uvicorn serves the app: httptools' HTTP/1.1 parser on uvloop, Nagle's algorithm off,
and the start-up heap frozen out of the garbage collector's full passes.

httptools and uvloop (uvicorn's "standard" choices) are C: measured on the load bench's
mix, h11 and asyncio's selector loop cost about a millisecond of CPU per request, a sixth
of the whole.

In multi-worker mode uvicorn binds the listening socket itself, without naming the TCP
protocol, and the loop then leaves TCP_NODELAY unset on the connections it accepts: every
response written in two pieces waited for the client's delayed ACK, about 40 ms (measured:
a `GET /v1/health` took 48 ms with two workers, 5 ms with one). Setting the option on each
connection makes the worker count irrelevant to latency.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import socket
import sys
import tempfile
from asyncio import BaseTransport
from collections.abc import Iterator
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

LOOP = "uvloop"
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def set_nodelay(transport: BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; each accepted connection gets TCP_NODELAY."""

    def connection_made(self, transport: Any) -> None:
        set_nodelay(transport)
        super().connection_made(transport)


def settle_server_process(gil_switch_ms: float) -> None:
    """What a server process does once its app is built: its startup heap frozen, and a
    shorter GIL switch interval than Python's 5 ms. The endpoints' threads give the GIL up
    at every SQLite call, then wait to get it back behind other threads' Python, up to a
    whole interval each time. On the load benchmark (SQLite, console in the mix, a noisy
    2-core VM) 0.5 ms gave the lower p99 in most runs at 350-400 requests/s (e.g. 86 and
    143 ms against 152-639 ms), for the same CPU; at 300 requests/s runs differed more
    between themselves than between the two settings."""
    freeze_startup_heap()
    sys.setswitchinterval(gil_switch_ms / 1000)


def freeze_startup_heap() -> None:
    """Move everything made so far (modules, the app, the ORM's mappers) out of the
    collector's sight: each full collection walked ~180,000 such objects and stopped the
    process for 85-165 ms under load (measured with gc.callbacks), which made a p99 of
    200-400 ms by itself; after the freeze a full collection takes 5-10 ms. Called once
    per server process after its app is built; objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


def uvicorn_options() -> dict[str, Any]:
    """The protocol and loop options `custody serve` gives uvicorn, and no logging
    configuration of its own: its records go through the process's JSON handler
    (`custody.logging.configure_logging`), like every other line."""
    return {"http": NoDelayHttpToolsProtocol, "loop": LOOP, "log_config": None}


@contextlib.contextmanager
def multiprocess_metrics(workers: int) -> Iterator[None]:
    """With several workers, each keeps its request metrics in files of a private
    directory (prometheus_client's multiprocess mode) that any worker's /v1/metrics sums:
    a scrape lands on one worker and must see them all. The directory is made empty at
    every start (a stale worker's files would be counted again) and removed at exit. The
    variable must be set before the workers import prometheus_client; one worker keeps
    its metrics in memory."""
    if workers <= 1:
        yield
        return
    directory = tempfile.mkdtemp(prefix="custody-metrics-")  # mode 0700, new and empty
    previous = os.environ.get(MULTIPROC_DIR)
    os.environ[MULTIPROC_DIR] = directory
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_DIR, None)
        else:
            os.environ[MULTIPROC_DIR] = previous
        shutil.rmtree(directory, ignore_errors=True)
