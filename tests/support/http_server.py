"""A local HTTP server for tests that need a peer (a webhook receiver, a price feed, a
screening provider): loopback only, on a free port, served from a thread and shut down
after. A client that gave up first (a timeout test) is no error of the server's: nothing
is printed for it; any other handler error still is."""

from __future__ import annotations

import ssl
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler still blocked at shutdown does not hold the test

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError | ConnectionResetError):
            return  # the client went away before the answer
        super().handle_error(request, client_address)


@contextmanager
def local_http_server(
    handler: type[BaseHTTPRequestHandler],
    *,
    tls: ssl.SSLContext | None = None,
    name: str = "127.0.0.1",
    poll: float = 0.5,
) -> Iterator[str]:
    """`handler` serving on 127.0.0.1: the server's base URL (`http://127.0.0.1:<port>`).
    With `tls` it serves https, and the URL says `name` (the certificate's, still loopback);
    `poll` is how often it looks for its shutdown (seconds)."""
    server = _Server(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(poll,), daemon=True)
    thread.start()
    scheme = "http" if tls is None else "https"
    try:
        yield f"{scheme}://{name}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def answer(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    content_type: str = "application/json",
) -> None:
    """A fake handler's whole reply: status, type, length and body."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
