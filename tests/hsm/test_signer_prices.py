"""The signer's own BTC/RUB oracle: exact Decimals from real HTTP answers, bounded
fetches, a median refused when stale, future-dated, disagreeing or too thin, and desk
quotes that only count once two people signed them.

Feeds are a real stdlib HTTP server on 127.0.0.1 (no httpx mocks); time is an injected
clock, never a sleep."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from hsm.prices import (
    MAX_RESPONSE_BYTES,
    DeskQuoteBook,
    HttpPriceSource,
    HttpSourceConfig,
    PriceFix,
    PriceOracle,
    Quote,
    parse_sources,
)
from hsm.signer import PolicyViolation

pytestmark = pytest.mark.unit

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SECRET = "SECRET-API-KEY-5f3a"


class Clock:
    """The signer's clock, moved by the test."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# --------------------------------------------------------------------------- local server


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True
    stream_total: int = 0  # > 0: write this many bytes in chunks, no Content-Length
    dribble: bool = False  # write the body one byte at a time, slowly
    hang: bool = False  # answer only when the test ends
    hits: int = 0
    sent: int = 0
    finished: bool = False  # the whole body was written
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class Feeds:
    base: str
    routes: dict[str, Route] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)

    def serve(self, path: str, payload: object = None, *, raw: bytes = b"", **kw: Any) -> str:
        body = raw if payload is None else json.dumps(payload).encode()
        self.routes[path] = Route(body=body, **kw)
        return self.url(path)

    def url(self, path: str) -> str:
        # Every feed URL carries an API key, as a real one may.
        return f"{self.base}{path}?apikey={SECRET}"


@pytest.fixture
def feeds() -> Iterator[Feeds]:
    state = Feeds(base="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = state.routes.get(self.path.split("?")[0])
            if route is None:
                route = Route(status=404)
            route.hits += 1
            try:
                self._answer(route)
                route.finished = True
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up: exactly what the bounds are for
            finally:
                route.done.set()

        def _answer(self, route: Route) -> None:
            if route.hang:
                state.release.wait(timeout=10)
            self.send_response(route.status)
            self.send_header("Content-Type", "application/json")
            for name, value in route.headers.items():
                self.send_header(name, value)
            if route.content_length and not route.stream_total:
                self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            if route.stream_total:
                chunk = b"0" * 65536
                while route.sent < route.stream_total:
                    self.wfile.write(chunk)
                    route.sent += len(chunk)
            elif route.dribble:
                for byte in route.body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    route.sent += 1
                    state.release.wait(timeout=0.05)  # the server's pace, not the test's
            else:
                self.wfile.write(route.body)
                route.sent = len(route.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def source(
    url: str,
    path: str = "p",
    *,
    name: str = "feed",
    time_path: str | None = None,
    timeout: float = 5.0,
    clock: Clock | None = None,
) -> HttpPriceSource:
    config = HttpSourceConfig(name, url, path, time_path=time_path, timeout=timeout)
    return HttpPriceSource(config, clock=clock or Clock())


def refusal(src: HttpPriceSource) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as caught:
        src.quote()
    assert caught.value.check == "price_source"
    assert caught.value.reason.startswith(f"{src.name}: ")
    return caught.value


# --------------------------------------------------------------------------- HTTP: values


def test_json_number_is_exact_and_dated_by_the_fetch(feeds: Feeds) -> None:
    url = feeds.serve("/n", raw=b'{"p": 8123456.12345678}')
    quote = source(url).quote()
    assert quote == Quote("feed", Decimal("8123456.12345678"), NOW)
    assert str(quote.price_rub_per_btc) == "8123456.12345678"
    assert float(quote.price_rub_per_btc) != quote.price_rub_per_btc  # a float would lose it
    assert quote.quoted_at.tzinfo is UTC


def test_json_integer_and_numeric_string(feeds: Feeds) -> None:
    assert source(feeds.serve("/i", raw=b'{"p": 7600000}')).quote().price_rub_per_btc == 7600000
    quote = source(feeds.serve("/s", {"p": "8123456.123456789"})).quote()
    assert str(quote.price_rub_per_btc) == "8123456.123456789"


def test_field_paths_with_list_indexes(feeds: Feeds) -> None:
    url = feeds.serve("/d", {"data": [{"price": "1"}, {"price": "7000000.5"}]})
    assert source(url, "data.1.price").quote().price_rub_per_btc == Decimal("7000000.5")
    url = feeds.serve("/top", [[1, 2], [3, "7100000"]])
    assert source(url, "1.1").quote().price_rub_per_btc == Decimal(7100000)
    url = feeds.serve("/key", {"rates": {"0": "7200000"}})  # a digit key in an object
    assert source(url, "rates.0").quote().price_rub_per_btc == Decimal(7200000)


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2025-03-01T11:58:00Z", datetime(2025, 3, 1, 11, 58, tzinfo=UTC)),
        ("2025-03-01T14:58:00+03:00", datetime(2025, 3, 1, 11, 58, tzinfo=UTC)),
        (1740830280, datetime(2025, 3, 1, 11, 58, tzinfo=UTC)),
        (1740830280.5, datetime(2025, 3, 1, 11, 58, 0, 500000, tzinfo=UTC)),
    ],
)
def test_time_path_iso_and_unix(feeds: Feeds, stamp: object, expected: datetime) -> None:
    url = feeds.serve("/t", {"result": [{"price": "7000000", "ts": stamp}]})
    quote = source(url, "result.0.price", time_path="result.0.ts").quote()
    assert quote.quoted_at == expected
    assert quote.quoted_at.tzinfo is UTC


@pytest.mark.parametrize(
    ("stamp", "why"),
    [
        ("2025-03-01T11:58:00", "has no timezone"),
        ("yesterday", "is not an ISO-8601 time"),
        ("1740830280", "is not an ISO-8601 time"),  # a string is ISO; seconds are a number
        (True, "boolean"),
        (None, "null"),
        ("__missing__", "ts missing"),
    ],
)
def test_bad_time_path_values(feeds: Feeds, stamp: object, why: str) -> None:
    payload: dict[str, object] = {"p": "7000000"}
    if stamp != "__missing__":
        payload["ts"] = stamp
    url = feeds.serve("/t", payload)
    assert why in refusal(source(url, time_path="ts")).reason


@pytest.mark.parametrize("raw", [b'{"p": 1, "ts": 1E+1000000}', b'{"p": 1, "ts": -1E+30}'])
def test_unix_time_out_of_range(feeds: Feeds, raw: bytes) -> None:
    url = feeds.serve("/t", raw=raw)
    assert "is out of range" in refusal(source(url, time_path="ts")).reason


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"p": NaN}', "not valid JSON"),
        (b'{"p": Infinity}', "not valid JSON"),
        (b'{"p": -Infinity}', "not valid JSON"),
        (b'{"p": 1E+99999999999999999999}', "not valid JSON"),  # beyond Decimal itself
        (b'{"p": 1E+1000000}', "sanity ceiling"),
        (b'{"p": "1E+1000000"}', "sanity ceiling"),
        (b'{"p": 1000000000000}', "sanity ceiling"),  # 10**12 itself is refused
        (b'{"p": 1E-1000000}', "below the smallest"),
        (b'{"p": 0.0000000000000000001}', "below the smallest"),
        (b'{"p": 1.0000000000000000001}', "more than 18 decimal places"),
        (b'{"p": -1}', "must be positive"),
        (b'{"p": "-1"}', "must be positive"),
        (b'{"p": 0}', "must be positive"),
        (b'{"p": "0.0"}', "must be positive"),
        (b'{"p": true}', "boolean"),
        (b'{"p": {}}', "an object, not a number"),
        (b'{"p": []}', "a list, not a number"),
        (b'{"p": null}', "null, not a number"),
        (b'{"p": "NaN"}', "'NaN' is not a number"),
        (b'{"p": "Infinity"}', "is not a number"),
        (b'{"p": " 7000000"}', "is not a number"),
        (b'{"p": "7_000_000"}', "is not a number"),
        (b'{"p": "abc"}', "'abc' is not a number"),
        (b'{"q": 7000000}', "p missing: no 'p' at the top"),
        (b"[7000000]", "p: a list at the top, 'p' is no index"),
        (b'{"p": 7}', None),  # control: the same route answers fine
        (b"<html>rate limited</html>", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 60000, "not valid JSON"),  # nesting deeper than the recursion limit
    ],
)
def test_bad_values_are_refused(feeds: Feeds, raw: bytes, why: str | None) -> None:
    src = source(feeds.serve("/v", raw=raw))
    if why is None:
        assert src.quote().price_rub_per_btc == 7
    else:
        assert why in refusal(src).reason


def test_bad_list_paths(feeds: Feeds) -> None:
    url = feeds.serve("/l", {"data": [{"price": 1}]})
    assert (
        "data.1.price missing: the list at data is too short"
        in refusal(source(url, "data.1.price")).reason
    )
    assert "is not an object or a list" in refusal(source(url, "data.0.price.x")).reason


# --------------------------------------------------------------------------- HTTP: transport


@pytest.mark.parametrize(("status", "why"), [(500, "HTTP 500"), (404, "HTTP 404")])
def test_http_errors(feeds: Feeds, status: int, why: str) -> None:
    url = feeds.serve("/e", {"p": 7000000}, status=status)
    assert refusal(source(url)).reason == f"feed: {why}"


def test_redirect_is_not_followed(feeds: Feeds) -> None:
    target = feeds.serve("/target", {"p": 7000000})
    url = feeds.serve("/r", status=302, headers={"Location": target})
    assert refusal(source(url)).reason == "feed: HTTP 302: redirects are not followed"
    assert feeds.routes["/target"].hits == 0


def test_big_answer_with_length_is_refused_unread(feeds: Feeds) -> None:
    url = feeds.serve("/big", raw=b" " * (5 * 1024 * 1024))
    reason = refusal(source(url)).reason
    assert reason == f"feed: answer larger than {MAX_RESPONSE_BYTES} bytes"


def test_big_answer_without_length_is_read_only_up_to_the_bound(feeds: Feeds) -> None:
    total = 64 * 1024 * 1024  # far beyond what loopback socket buffers can absorb
    url = feeds.serve("/stream", stream_total=total)
    reason = refusal(source(url)).reason
    assert reason == f"feed: answer larger than {MAX_RESPONSE_BYTES} bytes"
    assert feeds.routes["/stream"].done.wait(timeout=10)
    route = feeds.routes["/stream"]
    assert not route.finished  # the client hung up: the read stopped
    assert route.sent < total


def test_compressed_answer_is_refused(feeds: Feeds) -> None:
    url = feeds.serve("/gz", raw=b"\x1f\x8b", headers={"Content-Encoding": "gzip"})
    assert refusal(source(url)).reason == "feed: compressed answer ('gzip') refused"


def test_timeout_is_bounded(feeds: Feeds) -> None:
    url = feeds.serve("/slow", {"p": 7000000}, hang=True)
    started = time.monotonic()
    reason = refusal(source(url, timeout=0.3)).reason
    assert reason == "feed: timed out after 0.3s"
    assert time.monotonic() - started < 3


def test_a_dribbling_server_is_cut_off_at_the_deadline(feeds: Feeds) -> None:
    # Each byte arrives well inside the read timeout; only the overall deadline helps.
    url = feeds.serve("/drip", raw=b" " * 200 + b'{"p": 1}', dribble=True)
    started = time.monotonic()
    reason = refusal(source(url, timeout=0.3)).reason
    assert reason == "feed: timed out after 0.3s"
    assert time.monotonic() - started < 3
    assert feeds.routes["/drip"].sent < 200


def test_connection_refused() -> None:
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = source(f"http://127.0.0.1:{port}/p?apikey={SECRET}")
    assert refusal(src).reason == "feed: request failed (ConnectError)"


def test_the_url_never_appears_in_messages_or_logs(
    feeds: Feeds, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore included
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/p?apikey={SECRET}"
    clock = Clock()
    sources = [
        source(feeds.serve("/ok", {"p": "7000000"}), name="ok", clock=clock),
        source(feeds.serve("/e500", {"p": 1}, status=500), name="e500"),
        source(feeds.serve("/slow", {"p": 1}, hang=True), name="slow", timeout=0.3),
        source(feeds.serve("/r", status=302, headers={"Location": "/ok"}), name="redirect"),
        source(feeds.serve("/big", raw=b" " * (1 << 20)), name="big"),
        source(feeds.serve("/junk", raw=b"<html>"), name="junk"),
        source(feeds.serve("/miss", {"q": 1}), name="missing"),
        source(closed, name="closed"),
    ]
    messages: list[str] = []
    for src in sources[1:]:
        with pytest.raises(PolicyViolation) as caught:
            src.quote()
        messages += [str(caught.value), caught.value.reason, repr(caught.value.args)]
    oracle = PriceOracle(
        sources, None, max_age=timedelta(minutes=5), max_spread_bps=100, min_sources=2, clock=clock
    )
    with pytest.raises(PolicyViolation) as caught:
        oracle.fix()
    assert caught.value.check == "price_sources"
    assert all(f"{s.name}:" in caught.value.reason for s in sources[1:])
    messages += [str(caught.value), repr(sources[0]), repr(sources[0].config)]
    assert sources[0].quote().price_rub_per_btc == 7000000  # the URL does work
    assert caplog.records  # httpcore did log; none of it may carry the key
    for text in [*messages, caplog.text, *(str(r.args) for r in caplog.records)]:
        assert SECRET not in text
        assert feeds.base not in text


# --------------------------------------------------------------------------- config


def test_parse_sources() -> None:
    text = json.dumps(
        [
            {"name": "a", "url": "https://a.example/p?key=x", "field_path": "data.0.price"},
            {
                "name": "b",
                "url": "http://b.example/",
                "field_path": "p",
                "time_path": "ts",
                "timeout": 2,
            },
        ]
    )
    a, b = parse_sources(text)
    assert a == HttpSourceConfig("a", "https://a.example/p?key=x", "data.0.price", None, 5.0)
    assert b == HttpSourceConfig("b", "http://b.example/", "p", "ts", 2.0)
    assert isinstance(b.timeout, float)
    assert "key=x" not in repr(a)
    assert parse_sources("[]") == []
    hosts = ["http://[::1]:8080/p", "https://xn--e1afmkfd.xn--p1ai/p", "https://пример.рф/p"]
    for url in hosts:
        assert parse_sources(json.dumps([{"name": "h", "url": url, "field_path": "p"}]))


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ("not json", "not valid JSON"),
        ({"name": "a"}, "must be a JSON list"),
        (["x"], "#0 must be an object"),
        ([{"name": "a", "url": "http://a/"}], "missing keys ['field_path']"),
        ([{"name": "a", "url": "http://a/", "field_path": "p", "extra": 1}], "unknown keys"),
        ([{"name": "", "url": "http://a/", "field_path": "p"}], "name must be"),
        ([{"name": "desk", "url": "http://a/", "field_path": "p"}], "reserved"),
        ([{"name": "a", "url": f"ftp://a/?k={SECRET}", "field_path": "p"}], "http(s) URL"),
        ([{"name": "a", "url": f"http://[?k={SECRET}", "field_path": "p"}], "not a valid URL"),
        ([{"name": "a", "url": f"http://a:xx/?k={SECRET}", "field_path": "p"}], "not a valid URL"),
        ([{"name": "a", "url": f"http://a:70000/?k={SECRET}", "field_path": "p"}], "not a valid"),
        ([{"name": "a", "url": f"http://a b/?k={SECRET}", "field_path": "p"}], "not a valid URL"),
        ([{"name": "a", "url": 5, "field_path": "p"}], "url must be a string"),
        ([{"name": "a", "url": "http://a/", "field_path": "a..b"}], "empty segment"),
        ([{"name": "a", "url": "http://a/", "field_path": ""}], "field_path must be"),
        ([{"name": "a", "url": "http://a/", "field_path": "p", "time_path": 3}], "time_path"),
        ([{"name": "a", "url": "http://a/", "field_path": "p", "timeout": 0}], "timeout"),
        ([{"name": "a", "url": "http://a/", "field_path": "p", "timeout": 61}], "timeout"),
        ([{"name": "a", "url": "http://a/", "field_path": "p", "timeout": True}], "timeout"),
        ([{"name": "a", "url": "http://a/", "field_path": "p"}] * 2, "must be unique"),
    ],
)
def test_parse_sources_refuses_bad_config(entries: object, why: str) -> None:
    text = entries if isinstance(entries, str) else json.dumps(entries)
    with pytest.raises(ValueError) as caught:
        parse_sources(text)
    assert why in str(caught.value)
    assert SECRET not in str(caught.value)
    assert caught.value.__cause__ is None  # a chained error could quote the URL


# --------------------------------------------------------------------------- oracle


def oracle_over(
    feeds: Feeds,
    prices: Mapping[str, object],
    *,
    clock: Clock,
    times: Mapping[str, str] | None = None,
    desk: DeskQuoteBook | None = None,
    **kw: Any,
) -> PriceOracle:
    """One feed per name, each answering {"p": price[, "ts": time]}."""
    sources = []
    for name, price in prices.items():
        payload: dict[str, object] = {"p": price}
        if times and name in times:
            payload["ts"] = times[name]
        url = feeds.serve(f"/{name}", payload)
        time_path = "ts" if times and name in times else None
        sources.append(source(url, name=name, time_path=time_path, clock=clock))
    kw.setdefault("max_age", timedelta(minutes=5))
    kw.setdefault("max_spread_bps", 500)
    return PriceOracle(sources, desk, clock=clock, **kw)


def violation(oracle: PriceOracle, check: str) -> str:
    with pytest.raises(PolicyViolation) as caught:
        oracle.fix()
    assert caught.value.check == check, caught.value.reason
    return caught.value.reason


def test_median_of_an_odd_count_is_the_exact_middle(feeds: Feeds) -> None:
    clock = Clock()
    prices = {"a": "8123456.123456789", "b": "8100000", "c": "8200000.5"}
    fix = oracle_over(feeds, prices, clock=clock, min_sources=3).fix()
    assert str(fix.price_rub_per_btc) == "8123456.123456789"  # not rounded to 8 places
    assert fix.at == NOW
    assert [q.source for q in fix.quotes] == ["a", "b", "c"]
    assert fix.left_out == ()
    # (8200000.5 - 8100000) / 8123456.123456789 = 123.7... bps, rounded up
    assert fix.spread_bps == 124


@pytest.mark.parametrize(
    ("low", "high", "median"),
    [
        ("8123456.12345678", "8123456.12345679", "8123456.12345678"),  # .5 -> even 8
        ("1.00000001", "1.00000002", "1.00000002"),  # ...015 -> even 2
        ("1.00000002", "1.00000003", "1.00000002"),  # ...025 -> even 2
        ("7000000", "7000001", "7000000.50000000"),
    ],
)
def test_median_of_an_even_count_is_the_mean_half_even(
    feeds: Feeds, low: str, high: str, median: str
) -> None:
    fix = oracle_over(feeds, {"a": high, "b": low}, clock=Clock()).fix()
    assert str(fix.price_rub_per_btc) == median


def test_spread_bound_is_exact(feeds: Feeds) -> None:
    prices = {"a": "99.5", "b": "100", "c": "100.5"}  # exactly 100 bps around 100
    fix = oracle_over(feeds, prices, clock=Clock(), max_spread_bps=100).fix()
    assert fix.spread_bps == 100
    reason = violation(oracle_over(feeds, prices, clock=Clock(), max_spread_bps=99), "price_spread")
    assert "a=99.5, b=100, c=100.5" in reason
    assert "more than 99 bps" in reason


def test_spread_refused(feeds: Feeds) -> None:
    oracle = oracle_over(feeds, {"a": "7000000", "b": "7800000"}, clock=Clock(), max_spread_bps=100)
    reason = violation(oracle, "price_spread")
    assert "a=7000000" in reason and "b=7800000" in reason


def test_a_failed_source_is_left_out_and_recorded(feeds: Feeds) -> None:
    oracle = oracle_over(
        feeds, {"a": "7000000", "b": "7000100", "c": "7000200"}, clock=Clock(), min_sources=2
    )
    feeds.routes["/b"].status = 500
    fix = oracle.fix()
    assert fix.price_rub_per_btc == Decimal("7000100.00000000")  # mean of a and c
    assert fix.left_out == ("b: HTTP 500",)


def test_too_few_sources(feeds: Feeds) -> None:
    oracle = oracle_over(feeds, {"a": "7000000", "b": "7000100"}, clock=Clock(), min_sources=2)
    feeds.routes["/b"].body = b'{"p": NaN}'
    reason = violation(oracle, "price_sources")
    assert reason == "only 1 of 2 required BTC/RUB quotes: b: answer is not valid JSON"


def test_stale_quotes_are_left_out_then_refused(feeds: Feeds) -> None:
    clock = Clock()
    times = {"old": "2025-03-01T11:54:59Z", "edge": "2025-03-01T11:55:00Z"}
    prices = {"old": "7000000", "edge": "7000100", "now": "7000200"}
    fix = oracle_over(feeds, prices, clock=clock, times=times, min_sources=2).fix()
    assert [q.source for q in fix.quotes] == ["edge", "now"]  # exactly max_age is still fresh
    assert len(fix.left_out) == 1 and fix.left_out[0].startswith("old: stale")

    reason = violation(
        oracle_over(feeds, prices, clock=clock, times=times, min_sources=3), "price_stale"
    )
    assert "only 2 of 3" in reason and "old: stale (quoted 2025-03-01T11:54:59+00:00" in reason

    clock.now = NOW + timedelta(minutes=10)  # the signer's clock moves on; fetch-dated stays fresh
    oracle = oracle_over(feeds, prices, clock=clock, times=times, min_sources=2)
    reason = violation(oracle, "price_stale")
    assert "old: stale" in reason and "edge: stale" in reason and "now:" not in reason


def test_future_quotes_are_left_out_then_refused(feeds: Feeds) -> None:
    times = {"skew": "2025-03-01T12:01:00Z", "ahead": "2025-03-01T12:01:01Z"}
    prices = {"skew": "7000000", "ahead": "7000100", "now": "7000200"}
    fix = oracle_over(feeds, prices, clock=Clock(), times=times, min_sources=2).fix()
    assert [q.source for q in fix.quotes] == ["skew", "now"]  # 60 s of skew is allowed
    assert fix.left_out == ("ahead: dated in the future (2025-03-01T12:01:01+00:00)",)
    reason = violation(
        oracle_over(feeds, prices, clock=Clock(), times=times, min_sources=3), "price_future"
    )
    assert "ahead: dated in the future" in reason


def test_fix_round_trips_through_json(feeds: Feeds) -> None:
    oracle = oracle_over(
        feeds, {"a": "7000000.12345678", "b": "7000001", "c": "7000002"}, clock=Clock()
    )
    feeds.routes["/c"].status = 503
    fix = oracle.fix()
    data = json.loads(json.dumps(fix.to_json()))  # what the registry stores
    assert data["price_rub_per_btc"] == "7000000.56172839"
    assert data["quotes"][0] == {
        "source": "a",
        "price_rub_per_btc": "7000000.12345678",
        "quoted_at": "2025-03-01T12:00:00+00:00",
    }
    assert PriceFix.from_json(data) == fix


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"price_rub_per_btc": 7000000.5}, "must be a string"),
        ({"price_rub_per_btc": "NaN"}, "is not a number"),
        ({"at": "2025-03-01T12:00:00"}, "has no timezone"),
        ({"spread_bps": "3"}, "spread_bps must be an integer"),
        ({"quotes": []}, "non-empty list"),
        ({"extra": 1}, "unexpected keys ['extra']"),
    ],
)
def test_fix_from_json_is_strict(change: dict[str, object], why: str) -> None:
    quote = Quote("a", Decimal(7000000), NOW)
    data = {**PriceFix(Decimal(7000000), (quote,), NOW, 0).to_json(), **change}
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
        PriceFix.from_json(data)


def test_oracle_config_is_checked(feeds: Feeds) -> None:
    a = source(feeds.url("/a"), name="a")
    with pytest.raises(ValueError, match="unique"):
        PriceOracle([a, a], None, max_age=timedelta(minutes=5), max_spread_bps=10)
    with pytest.raises(ValueError, match="min_sources"):
        PriceOracle([a], None, max_age=timedelta(minutes=5), max_spread_bps=10, min_sources=2)
    with pytest.raises(ValueError, match="at least one source"):
        PriceOracle([], None, max_age=timedelta(minutes=5), max_spread_bps=10)
    with pytest.raises(ValueError, match="max_age"):
        PriceOracle([a], None, max_age=timedelta(0), max_spread_bps=10)


# --------------------------------------------------------------------------- desk quotes


class FakeVerify:
    """Stands in for hsm.approvals: accepts endorsements == ["ok"], else refuses."""

    def __init__(self, names: tuple[str, ...] = ("alice", "bob")) -> None:
        self.names = names
        self.calls: list[tuple[dict[str, Any], list[Any]]] = []

    def __call__(
        self, statement: Mapping[str, Any], endorsements: Sequence[Any]
    ) -> tuple[str, ...]:
        self.calls.append((dict(statement), list(endorsements)))
        if list(endorsements) != ["ok"]:
            raise PolicyViolation("approval_signers", "needs two distinct enrolled people")
        return self.names


def statement(**change: object) -> dict[str, object]:
    base: dict[str, object] = {
        "kind": "desk_quote",
        "source": "desk",
        "price_rub_per_btc": "7000000.25",
        "quoted_at": "2025-03-01T11:59:00Z",
        "expires_at": "2025-03-01T12:30:00Z",
    }
    base.update(change)
    return {k: v for k, v in base.items() if v is not None}


def test_desk_quote_accepted_and_used_by_the_oracle(feeds: Feeds) -> None:
    verify = FakeVerify()
    desk = DeskQuoteBook(verify, max_age=timedelta(minutes=15))
    assert desk.current(NOW) is None
    quote = desk.submit(statement(), ["ok"], NOW)
    assert quote == Quote("desk", Decimal("7000000.25"), datetime(2025, 3, 1, 11, 59, tzinfo=UTC))
    assert verify.calls == [(statement(), ["ok"])]
    assert desk.current(NOW) == quote
    assert desk.approved_by == ("alice", "bob")

    clock = Clock()
    oracle = oracle_over(feeds, {"a": "7000000.75"}, clock=clock, desk=desk, min_sources=2)
    fix = oracle.fix()
    assert fix.price_rub_per_btc == Decimal("7000000.50000000")
    assert {q.source for q in fix.quotes} == {"a", "desk"}

    # A newer quote replaces it; it ages out by max_age, and by its own expiry.
    newer = desk.submit(statement(quoted_at="2025-03-01T12:00:00Z"), ["ok"], NOW)
    assert desk.current(NOW + timedelta(minutes=15)) == newer
    assert desk.current(NOW + timedelta(minutes=15, seconds=1)) is None
    short = DeskQuoteBook(FakeVerify(), max_age=timedelta(hours=1))
    short.submit(statement(), ["ok"], NOW)
    assert short.current(datetime(2025, 3, 1, 12, 29, 59, tzinfo=UTC)) is not None
    assert short.current(datetime(2025, 3, 1, 12, 30, tzinfo=UTC)) is None


def test_oracle_records_a_missing_desk_quote(feeds: Feeds) -> None:
    desk = DeskQuoteBook(FakeVerify(), max_age=timedelta(minutes=15))
    fix = oracle_over(feeds, {"a": "7000000"}, clock=Clock(), desk=desk).fix()
    assert fix.left_out == ("desk: no current desk quote",)
    reason = violation(
        oracle_over(feeds, {"a": "7000000"}, clock=Clock(), desk=desk, min_sources=2),
        "price_sources",
    )
    assert "desk: no current desk quote" in reason


@pytest.mark.parametrize(
    ("change", "check", "why"),
    [
        ({"kind": "withdrawal"}, "desk_quote", "kind must be 'desk_quote'"),
        ({"note": "hi"}, "desk_quote", "unexpected keys ['note']"),
        ({"expires_at": None}, "desk_quote", "missing keys ['expires_at']"),
        ({"source": "feed"}, "desk_quote", "source must be 'desk'"),
        ({"price_rub_per_btc": 7000000}, "desk_quote", "must be a decimal string"),
        ({"price_rub_per_btc": 7000000.25}, "desk_quote", "must be a decimal string"),
        ({"price_rub_per_btc": "NaN"}, "desk_quote", "is not a number"),
        ({"price_rub_per_btc": "Infinity"}, "desk_quote", "is not a number"),
        ({"price_rub_per_btc": "1E+1000000"}, "desk_quote", "sanity ceiling"),
        ({"price_rub_per_btc": "0"}, "desk_quote", "must be positive"),
        ({"price_rub_per_btc": "-1"}, "desk_quote", "must be positive"),
        ({"quoted_at": "2025-03-01T11:59:00"}, "desk_quote", "is not in UTC"),
        ({"quoted_at": "2025-03-01T14:59:00+03:00"}, "desk_quote", "is not in UTC"),
        ({"quoted_at": 1740830340}, "desk_quote", "quoted_at must be an ISO-8601 string"),
        ({"expires_at": "soon"}, "desk_quote", "is not ISO-8601"),
        ({"expires_at": "2025-03-01T11:58:00Z"}, "desk_quote", "after quoted_at"),
        ({"quoted_at": "2025-03-01T12:01:01Z"}, "desk_quote_future", "in the future"),
        ({"quoted_at": "2025-03-01T11:44:59Z"}, "desk_quote_stale", "older than 0:15:00"),
        (
            {"quoted_at": "2025-03-01T11:50:00Z", "expires_at": "2025-03-01T12:00:00Z"},
            "desk_quote_expired",
            "expired at 2025-03-01T12:00:00+00:00",
        ),
    ],
)
def test_desk_quote_refused(change: dict[str, object], check: str, why: str) -> None:
    verify = FakeVerify()
    desk = DeskQuoteBook(verify, max_age=timedelta(minutes=15))
    with pytest.raises(PolicyViolation) as caught:
        desk.submit(statement(**change), ["ok"], NOW)
    assert caught.value.check == check
    assert why in caught.value.reason
    assert verify.calls == []  # refused before any signature was looked at
    assert desk.current(NOW) is None


def test_desk_quote_edges_are_accepted() -> None:
    desk = DeskQuoteBook(FakeVerify(), max_age=timedelta(minutes=15))
    assert desk.submit(statement(quoted_at="2025-03-01T12:01:00Z"), ["ok"], NOW)  # 60 s skew
    other = DeskQuoteBook(FakeVerify(), max_age=timedelta(minutes=15))
    assert other.submit(statement(quoted_at="2025-03-01T11:45:00+00:00"), ["ok"], NOW)


def test_desk_quote_refused_when_verify_refuses() -> None:
    verify = FakeVerify()
    desk = DeskQuoteBook(verify, max_age=timedelta(minutes=15))
    with pytest.raises(PolicyViolation) as caught:
        desk.submit(statement(), ["forged"], NOW)
    assert caught.value.check == "approval_signers"  # verify's own refusal, unchanged
    assert len(verify.calls) == 1
    assert desk.current(NOW) is None


def test_desk_quote_needs_two_names_even_if_verify_forgets() -> None:
    desk = DeskQuoteBook(FakeVerify(names=("alice", "alice")), max_age=timedelta(minutes=15))
    with pytest.raises(PolicyViolation) as caught:
        desk.submit(statement(), ["ok"], NOW)
    assert caught.value.check == "desk_quote_approvals"
    assert desk.current(NOW) is None


def test_an_older_desk_quote_does_not_replace_a_newer_one() -> None:
    verify = FakeVerify()
    desk = DeskQuoteBook(verify, max_age=timedelta(minutes=15))
    held = desk.submit(statement(quoted_at="2025-03-01T11:59:30Z"), ["ok"], NOW)
    for older in (
        statement(quoted_at="2025-03-01T11:59:00Z"),
        statement(quoted_at="2025-03-01T11:59:30Z", price_rub_per_btc="6000000"),
    ):
        with pytest.raises(PolicyViolation) as caught:
            desk.submit(older, ["ok"], NOW)
        assert caught.value.check == "desk_quote_superseded"
        assert "already held" in caught.value.reason
    assert desk.current(NOW) == held
    assert len(verify.calls) == 1
    # The same quote again is harmless.
    assert desk.submit(statement(quoted_at="2025-03-01T11:59:30Z"), ["ok"], NOW) == held
