"""An ASGI app served by uvicorn from a thread of the test's own process, on 127.0.0.1 only:
for a test that needs a real HTTP server (a CLI talking to the API, a browser) without
another process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from regtest.wait import wait_until


@contextmanager
def served(app: Any, port: int, *, host_name: str = "127.0.0.1") -> Iterator[str]:
    """`app` on 127.0.0.1:`port` until the block ends: its base URL under `host_name`
    (`localhost` for the console, whose passkeys need a domain name)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"served-{port}", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=30, message=f"uvicorn serving on {port}")
        yield f"http://{host_name}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
