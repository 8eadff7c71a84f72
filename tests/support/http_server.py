"""A local HTTP server for tests that need a peer (a webhook receiver): loopback only, on a
free port, served from a thread and shut down after."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def local_http_server(
    handler: type[BaseHTTPRequestHandler],
    *,
    tls: ssl.SSLContext | None = None,
    name: str = "127.0.0.1",
) -> Iterator[str]:
    """`handler` serving on 127.0.0.1: the server's base URL (`http://127.0.0.1:<port>`).
    With `tls` it serves https, and the URL says `name` (the certificate's, still loopback)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "http" if tls is None else "https"
    try:
        yield f"{scheme}://{name}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
