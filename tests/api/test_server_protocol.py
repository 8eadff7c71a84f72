"""custody serve's HTTP protocol turns Nagle's algorithm off on every connection it accepts
(uvicorn's multi-worker listening socket left it on: each answer waited for a delayed ACK)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from custody.api.server import NoDelayHttpToolsProtocol


class _Transport(asyncio.Transport):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "socket":
            return self.sock
        if name in ("peername", "sockname"):
            return self.sock.getsockname()
        return default


async def _ok(scope: object, receive: object, send: object) -> None:  # an ASGI app
    return None


@pytest.mark.unit
def test_an_accepted_connection_gets_tcp_nodelay() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0)  # no protocol named
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    loop = asyncio.new_event_loop()
    try:
        # as uvicorn hands it over
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        protocol = NoDelayHttpToolsProtocol(
            Config(_ok, lifespan="off"), ServerState(), app_state={}, _loop=loop
        )
        protocol.connection_made(_Transport(accepted))
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        loop.close()
        for s in (client, accepted, listener):
            s.close()


@pytest.mark.unit
def test_the_startup_heap_is_frozen_and_later_garbage_still_collected() -> None:
    import gc
    import weakref

    from custody.api.server import freeze_startup_heap

    class Node:
        other: object = None

    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after the freeze
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()


@pytest.mark.unit
def test_a_server_process_shortens_its_gil_switch_interval_as_configured() -> None:
    import gc
    import sys

    from custody.api.server import settle_server_process
    from custody.config import Settings

    before = sys.getswitchinterval()
    try:
        settle_server_process(Settings().api_gil_switch_ms)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        settle_server_process(2.0)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)
        gc.unfreeze()
    with pytest.raises(ValueError, match="api_gil_switch_ms"):
        Settings(api_gil_switch_ms=0)
