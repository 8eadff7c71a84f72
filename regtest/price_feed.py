"""A BTC/RUB JSON price feed on 127.0.0.1 for tests and the demo: a real HTTP server
whose answer the test sets (`feed.set("8000000")`), polled by the service's and the
signer's HTTP price sources exactly as a real feed would be."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class PriceFeed:
    def __init__(self, price: str = "8000000") -> None:
        self.price = price
        self.quoted_at: datetime | None = None  # None: "now" at each request
        self.requests = 0
        feed = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                feed.requests += 1
                at = feed.quoted_at or datetime.now(UTC)
                body = json.dumps({"data": {"price": feed.price, "time": at.isoformat()}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/btcrub"

    def source_config(self, name: str = "feed") -> dict[str, Any]:
        """The source as both the service and the signer configure it."""
        return {"name": name, "url": self.url, "field_path": "data.price", "time_path": "data.time"}

    def set(self, price: str, quoted_at: datetime | None = None) -> None:
        self.price = price
        self.quoted_at = quoted_at

    def start(self) -> PriceFeed:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def price_feed(price: str = "8000000") -> Iterator[PriceFeed]:
    feed = PriceFeed(price).start()
    try:
        yield feed
    finally:
        feed.stop()
