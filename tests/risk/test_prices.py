"""Price sources: exact Decimals, honest failures, and a median that refuses to act
on stale or disagreeing prices. The HTTP source talks to a real server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler

import httpx
import pytest
from support.http_server import answer, local_http_server

from custody.risk.prices import (
    Consensus,
    HttpJsonPriceSource,
    ManualPriceSource,
    MedianPriceSource,
    PriceQuote,
    PriceSource,
    PriceUnavailable,
    parse_field_path,
)
from pledge.errors import CustodyError, InvalidInput

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def clock() -> datetime:
    return NOW


# --------------------------------------------------------------------------- local server


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    block_until: threading.Event | None = None  # hold the answer until set (timeouts)


@dataclass
class PriceServer:
    base: str
    routes: dict[str, Route] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)

    def serve(
        self, path: str, payload: object = None, *, status: int = 200, raw: bytes = b""
    ) -> str:
        body = raw if payload is None else json.dumps(payload).encode()
        self.routes[path] = Route(status=status, body=body)
        return self.base + path

    def hang(self, path: str) -> str:
        self.routes[path.split("?")[0]] = Route(block_until=self.release)
        return self.base + path


@pytest.fixture
def server() -> Iterator[PriceServer]:
    state = PriceServer(base="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = state.routes.get(self.path.split("?")[0], Route(status=404))
            if route.block_until is not None:
                route.block_until.wait(timeout=10)
            answer(self, route.status, route.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with local_http_server(Handler, poll=0.02) as state.base:
        try:
            yield state
        finally:
            state.release.set()  # let a blocked handler finish before shutting down


def http_source(url: str, path: str, **kwargs: object) -> HttpJsonPriceSource:
    return HttpJsonPriceSource("feed", url, path, clock=clock, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- manual


def test_manual_set_then_quote() -> None:
    source = ManualPriceSource()
    with pytest.raises(PriceUnavailable, match="manual: no price has been set"):
        source.quote()
    msk = timezone(timedelta(hours=3))
    quote = source.set(Decimal("8123456.12345678"), datetime(2025, 3, 1, 15, 0, tzinfo=msk), "ivan")
    assert quote == PriceQuote(Decimal("8123456.12345678"), "manual", NOW)
    assert quote.quoted_at.tzinfo is UTC
    assert source.quote() is quote
    assert source.set_by == "ivan"
    assert isinstance(source, PriceSource)


@pytest.mark.parametrize(
    ("price", "why"),
    [
        (Decimal(0), "positive"),
        (Decimal("-1"), "positive"),
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        (Decimal(10) ** 12 + 1, "ceiling"),
        (Decimal("1.123456789"), "8 decimal places"),
        (8_000_000.5, "float"),
    ],
)
def test_manual_refuses_bad_prices(price: Decimal, why: str) -> None:
    source = ManualPriceSource()
    with pytest.raises(InvalidInput, match=why) as caught:
        source.set(price, NOW, "ivan")
    assert caught.value.field == "price"
    with pytest.raises(PriceUnavailable):  # nothing was stored
        source.quote()


def test_manual_accepts_edges_and_refuses_naive_time_or_anonymous() -> None:
    source = ManualPriceSource("desk")
    # the ceiling is the kernel's, shared with the bank's signer: 10**12 itself is refused
    assert source.set(Decimal(10) ** 12 - 1, NOW, "ivan").source == "desk"
    with pytest.raises(InvalidInput, match="sanity ceiling"):
        source.set(Decimal(10) ** 12, NOW, "ivan")
    assert source.set(Decimal("1.000000000000"), NOW, "ivan").price_rub_per_btc == 1  # zeros only
    assert source.set(Decimal("0.00000001"), NOW, "ivan").price_rub_per_btc == Decimal("1E-8")
    with pytest.raises(InvalidInput) as caught:
        source.set(Decimal(1), datetime(2025, 3, 1, 12, 0), "ivan")
    assert caught.value.field == "at"
    with pytest.raises(InvalidInput) as caught:
        source.set(Decimal(1), NOW, "  ")
    assert caught.value.field == "by"


# --------------------------------------------------------------------------- HTTP


def test_http_json_number_without_float_rounding(server: PriceServer) -> None:
    url = server.serve("/n", raw=b'{"data": {"rates": {"RUB": 8123456.12345678}}}')
    quote = http_source(url, "data.rates.RUB").quote()
    assert quote.price_rub_per_btc == Decimal("8123456.12345678")
    assert str(quote.price_rub_per_btc) == "8123456.12345678"
    assert float(quote.price_rub_per_btc) != quote.price_rub_per_btc  # a float would have lost it
    assert quote.source == "feed"
    assert quote.quoted_at == NOW  # no time_path: the fetch time


def test_http_numeric_string_and_nested_index(server: PriceServer) -> None:
    url = server.serve("/s", {"result": [{"price": "1"}, {"price": "8123456.12345678"}]})
    quote = http_source(url, "result[1].price").quote()
    assert quote.price_rub_per_btc == Decimal("8123456.12345678")
    url = server.serve("/i", [[1, 2], [3, 7600000]])
    assert http_source(url, "[1][1]").quote().price_rub_per_btc == Decimal(7600000)


@pytest.mark.parametrize(
    ("payload", "path", "why"),
    [
        ({"data": {}}, "data.rates.RUB", "data.rates.RUB missing: no 'rates'"),
        ({"result": []}, "result[0].price", "result\\[0\\].price missing"),
        ({"result": {"0": 1}}, "result[0]", "expected a list at result"),
        ({"p": "abc"}, "p", "price is not a number: 'abc'"),
        ({"p": "NaN"}, "p", "price is not a number"),
        ({"p": True}, "p", "boolean"),
        ({"p": None}, "p", "not a number"),
        ({"p": -5}, "p", "price -5 must be positive"),
        ({"p": "0"}, "p", "must be positive"),
        ({"p": 1e15}, "p", "sanity ceiling"),
    ],
)
def test_http_bad_values(server: PriceServer, payload: object, path: str, why: str) -> None:
    url = server.serve("/bad", payload)
    with pytest.raises(PriceUnavailable, match=f"^feed: .*{why}"):
        http_source(url, path).quote()


@pytest.mark.parametrize(
    ("status", "body", "why"),
    [
        (500, b'{"p": 1}', "feed: HTTP 500"),
        (404, b"", "feed: HTTP 404"),
        (200, b"<html>rate limited</html>", "feed: answer is not valid JSON"),
        (200, b'{"p": NaN}', "feed: answer is not valid JSON"),
        (200, b"\xff\xfe", "feed: answer is not valid JSON"),
    ],
)
def test_http_error_answers(server: PriceServer, status: int, body: bytes, why: str) -> None:
    url = server.serve("/e", status=status, raw=body)
    with pytest.raises(PriceUnavailable, match=why) as caught:
        http_source(url, "p").quote()
    assert caught.value.status_code == 503
    assert isinstance(caught.value, CustodyError)


def test_http_timeout(server: PriceServer) -> None:
    url = server.hang("/slow?key=sekret")
    with pytest.raises(PriceUnavailable, match=r"^feed: timed out after 0.2s$") as caught:
        http_source(url, "p", timeout=0.2).quote()
    assert "sekret" not in str(caught.value)


def test_http_connection_refused_does_not_leak_url(server: PriceServer) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connect to https://feed.example/?apikey=sekret", request=request)

    client = httpx.Client(transport=httpx.MockTransport(refuse))
    source = HttpJsonPriceSource("feed", "https://feed.example/?apikey=sekret", "p", client=client)
    with pytest.raises(
        PriceUnavailable, match=r"^feed: request failed \(ConnectError\)$"
    ) as caught:
        source.quote()
    assert "sekret" not in caught.value.message


def test_http_given_client_gets_the_timeout() -> None:
    seen: list[object] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json={"p": "7000000.5"})

    client = httpx.Client(transport=httpx.MockTransport(answer))
    source = HttpJsonPriceSource("feed", "https://feed.example/", "p", client=client, timeout=1.5)
    assert source.quote().price_rub_per_btc == Decimal("7000000.5")
    assert seen == [{"connect": 1.5, "read": 1.5, "write": 1.5, "pool": 1.5}]


def test_http_refuses_oversized_answer() -> None:
    client = httpx.Client(
        transport=httpx.MockTransport(lambda _r: httpx.Response(200, content=b" " * (2 << 20)))
    )
    source = HttpJsonPriceSource("feed", "https://feed.example/", "p", client=client)
    with pytest.raises(PriceUnavailable, match="larger than"):
        source.quote()


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2025-03-01T11:58:00Z", datetime(2025, 3, 1, 11, 58, tzinfo=UTC)),
        ("2025-03-01T14:58:00+03:00", datetime(2025, 3, 1, 11, 58, tzinfo=UTC)),
        (1740830280, datetime(2025, 3, 1, 11, 58, tzinfo=UTC)),
        ("1740830280.5", datetime(2025, 3, 1, 11, 58, 0, 500000, tzinfo=UTC)),
    ],
)
def test_http_time_path(server: PriceServer, stamp: object, expected: datetime) -> None:
    url = server.serve("/t", {"ticker": {"last": "8000000", "ts": stamp}})
    quote = http_source(url, "ticker.last", time_path="ticker.ts").quote()
    assert quote.quoted_at == expected
    assert quote.quoted_at.tzinfo is UTC


@pytest.mark.parametrize(
    ("stamp", "why"),
    [
        ("2025-03-01T11:58:00", "has no timezone"),
        ("yesterday", "is not ISO-8601"),
        (10**20, "out of range"),
    ],
)
def test_http_bad_time(server: PriceServer, stamp: object, why: str) -> None:
    url = server.serve("/bt", {"p": 1, "ts": stamp})
    with pytest.raises(PriceUnavailable, match=why):
        http_source(url, "p", time_path="ts").quote()


@pytest.mark.parametrize(
    ("url", "path", "field_name"),
    [
        ("ftp://feed.example/p", "p", "url"),
        ("file:///etc/passwd", "p", "url"),
        ("https://feed.example/", "a..b", "field_path"),
        ("https://feed.example/", "a[x]", "field_path"),
        ("https://feed.example/", "a.[0]", "field_path"),
        ("https://feed.example/", "", "field_path"),
    ],
)
def test_http_config_refused(url: str, path: str, field_name: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        HttpJsonPriceSource("feed", url, path)
    assert caught.value.field == field_name


def test_field_path_parsing() -> None:
    assert parse_field_path("data.rates.RUB") == ("data", "rates", "RUB")
    assert parse_field_path("result[0].price") == ("result", 0, "price")
    assert parse_field_path("[2][10].p") == (2, 10, "p")


# --------------------------------------------------------------------------- median


@dataclass
class Fixed:
    name: str
    price: str | None = None
    age: timedelta = timedelta(0)
    error: Exception | None = None

    def quote(self) -> PriceQuote:
        if self.error is not None:
            raise self.error
        assert self.price is not None
        return PriceQuote(Decimal(self.price), self.name, NOW - self.age)


def median(*sources: PriceSource, bps: int = 200, need: int = 1) -> MedianPriceSource:
    return MedianPriceSource(
        sources, max_age=timedelta(minutes=5), max_spread_bps=bps, min_sources=need, clock=clock
    )


def test_median_odd_count() -> None:
    older = Fixed("b", "8000100", age=timedelta(minutes=2))
    result = median(Fixed("a", "8000000"), older, Fixed("c", "8000200")).consensus()
    assert result.usable and result.reason is None
    assert result.quote == PriceQuote(
        Decimal("8000100"), "median(a,b,c)", NOW - timedelta(minutes=2)
    )
    assert len(result.quotes) == 3 and result.failures == ()


def test_median_even_count_is_mean_of_middle_quantized() -> None:
    result = median(
        Fixed("a", "8000000.00000001"),
        Fixed("b", "8000000.00000002"),
        Fixed("c", "1"),
        Fixed("d", "8000000.1"),
        bps=10**6,
    ).consensus()
    assert result.quote is not None
    # mean of the middle two is ...015: quantized to 8 dp, half to even
    assert result.quote.price_rub_per_btc == Decimal("8000000.00000002")
    assert result.quote.price_rub_per_btc.as_tuple().exponent == -8
    even = median(Fixed("a", "100"), Fixed("b", "101")).quote()
    assert even.price_rub_per_btc == Decimal("100.5")


def test_median_drops_stale_and_future_quotes() -> None:
    stale = Fixed("old", "1", age=timedelta(minutes=5, seconds=1))
    future = Fixed("ahead", "1", age=-timedelta(minutes=1))
    edge = Fixed("edge", "8000000", age=timedelta(minutes=5))  # exactly max_age is fresh
    result = median(Fixed("a", "8000100"), stale, future, edge).consensus()
    assert result.usable
    assert result.quote is not None
    assert result.quote.source == "median(a,edge)"
    assert result.quote.price_rub_per_btc == Decimal("8000050.00000000")
    assert result.failures == ("old: stale (older than 5m)", "ahead: dated in the future")


def test_median_all_stale_is_unusable() -> None:
    source = median(Fixed("a", "1", age=timedelta(hours=1)), Fixed("b", "1", age=timedelta(days=1)))
    result = source.consensus()
    assert result == Consensus(
        quote=None,
        usable=False,
        reason=(
            "all prices are stale (0 of 1 needed: a: stale (older than 5m); "
            "b: stale (older than 5m)): automatic liquidation paused"
        ),
        quotes=(),
        failures=("a: stale (older than 5m)", "b: stale (older than 5m)"),
    )
    with pytest.raises(PriceUnavailable, match="stale") as caught:
        source.quote()
    assert caught.value.message == result.reason


def test_median_min_sources() -> None:
    down = Fixed("b", error=PriceUnavailable("b: HTTP 502"))
    result = median(Fixed("a", "100"), down, need=2).consensus()
    assert not result.usable and result.quote is None
    assert result.reason == (
        "not enough fresh prices (1 of 2 needed: b: HTTP 502): automatic liquidation paused"
    )


def test_median_failing_source_listed_rest_decide() -> None:
    manual = ManualPriceSource()  # never set: fails with its own message
    crash = Fixed("buggy", error=RuntimeError("boom"))
    result = median(Fixed("a", "100"), manual, crash, Fixed("c", "102"), need=2).consensus()
    assert result.usable
    assert result.quote is not None and result.quote.price_rub_per_btc == Decimal("101.00000000")
    assert result.quote.source == "median(a,c)"
    assert result.failures == ("manual: no price has been set", "buggy: unexpected RuntimeError")


@pytest.mark.parametrize(
    ("low", "high", "usable", "reason"),
    [
        ("100", "101.99", True, None),  # 1.99/100.995 = 1.97%
        ("99", "101", True, None),  # exactly 2% of the median 100: at the bound is allowed
        (
            "99",
            "101.01",
            False,
            "sources disagree by 2.01% (bound 2%): automatic liquidation paused",
        ),
    ],
)
def test_median_disagreement_bound(low: str, high: str, usable: bool, reason: str | None) -> None:
    result = median(Fixed("a", low), Fixed("b", high)).consensus()
    assert result.usable is usable
    assert result.reason == reason
    assert (result.quote is None) is not usable
    assert len(result.quotes) == 2


def test_median_disagreement_message() -> None:
    source = median(Fixed("a", "100"), Fixed("b", "100"), Fixed("c", "103.1"), bps=250)
    with pytest.raises(
        PriceUnavailable,
        match=r"^sources disagree by 3.1% \(bound 2.5%\): automatic liquidation paused$",
    ):
        source.quote()


def test_median_over_http(server: PriceServer) -> None:
    a = HttpJsonPriceSource("a", server.serve("/a", {"p": "8000000"}), "p", clock=clock)
    b = HttpJsonPriceSource("b", server.serve("/b", status=500), "p", clock=clock)
    c = HttpJsonPriceSource("c", server.serve("/c", {"p": 8000400}), "p", clock=clock)
    result = MedianPriceSource(
        [a, b, c], max_age=timedelta(minutes=5), max_spread_bps=100, min_sources=2, clock=clock
    ).consensus()
    assert result.usable and result.quote is not None
    assert result.quote.price_rub_per_btc == Decimal("8000200.00000000")
    assert result.failures == ("b: HTTP 500",)


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"max_age": timedelta(0)}, "max_age"),
        ({"max_spread_bps": -1}, "max_spread_bps"),
        ({"min_sources": 3}, "min_sources"),
        ({"min_sources": 0}, "min_sources"),
    ],
)
def test_median_config_refused(kwargs: dict[str, object], field_name: str) -> None:
    args: dict[str, object] = {"max_age": timedelta(minutes=5), "max_spread_bps": 200}
    args.update(kwargs)
    with pytest.raises(InvalidInput) as caught:
        MedianPriceSource([Fixed("a", "1"), Fixed("b", "1")], **args)  # type: ignore[arg-type]
    assert caught.value.field == field_name
    with pytest.raises(InvalidInput, match="unique"):
        median(Fixed("a", "1"), Fixed("a", "2"))
