"""BTC/RUB price sources for the risk engine.

A price decides whether a client's collateral is sold, so every number here is a
`Decimal` that never passed through a float, carries the source it came from and
the time it was true, and any doubt (a source down, stale, or sources disagreeing)
turns into "automatic liquidation paused, because ..." rather than a guess.

Sources:
- `ManualPriceSource`: the last price bank staff set (the API audits and persists it).
- `HttpJsonPriceSource`: one JSON HTTP endpoint, value picked by a field path.
- `MedianPriceSource`: the median of several, with a staleness limit and a bound on
  how far they may disagree.

Error messages name the source, never its URL: a price feed URL may hold an API key.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, ROUND_UP, Decimal, InvalidOperation, localcontext
from typing import Any, Protocol, runtime_checkable

import httpx
import structlog

from pledge.errors import InvalidInput, UpstreamUnavailable
from pledge.prices import check_quote, price_problem
from pledge.tls import client_tls

log = structlog.get_logger(__name__)

PRICE_DECIMAL_PLACES = 8
_PRICE_QUANTUM = Decimal(1).scaleb(-PRICE_DECIMAL_PLACES)
MAX_RESPONSE_BYTES = 1 << 20  # a price answer is small; a huge one is a wrong or hostile URL
_NUMERIC_STRING = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
# Arithmetic on prices must be exact: prices are < 10**12 with few decimals, so 60 digits
# is far more than any sum or mean below needs.
_EXACT_PRECISION = 60


def now_utc() -> datetime:
    return datetime.now(UTC)


class PriceUnavailable(UpstreamUnavailable):
    """No trustworthy price: a source is down, answered nonsense, or the sources are
    stale or disagree. The message says which source and why (never its URL)."""

    status_code = 503
    code = "price_unavailable"


@dataclass(frozen=True)
class PriceQuote:
    """RUB per BTC, who said so, and when it was true (aware, normalised to UTC)."""

    price_rub_per_btc: Decimal
    source: str
    quoted_at: datetime

    def __post_init__(self) -> None:
        at = check_quote(self.price_rub_per_btc, self.source, self.quoted_at)
        object.__setattr__(self, "quoted_at", at)


@runtime_checkable
class PriceSource(Protocol):
    name: str

    def quote(self) -> PriceQuote: ...


def _decimal_places(price: Decimal) -> int:
    # Trailing zeros carry no information: 1.000000000 has 0 decimal places that matter.
    exponent = price.normalize().as_tuple().exponent
    assert isinstance(exponent, int)  # finite, checked by the caller
    return max(0, -exponent)


# --------------------------------------------------------------------------- manual


class ManualPriceSource:
    """The price bank staff last set. This is the in-memory view; the API layer
    persists the value and writes the audit event (who, what, when)."""

    def __init__(self, name: str = "manual") -> None:
        if not name:
            raise InvalidInput("a price source needs a name", field="name")
        self.name = name
        self._lock = threading.Lock()
        self._quote: PriceQuote | None = None
        self._set_by: str | None = None

    @property
    def set_by(self) -> str | None:
        """Who set the current price (for display; the audit log is the record)."""
        return self._set_by

    def set(self, price: Decimal, at: datetime, by: str) -> PriceQuote:
        if not isinstance(price, Decimal):
            # A float has already lost digits; an int would pass but say "be exact" once.
            raise InvalidInput("price must be a decimal number (not a float)", field="price")
        problem = price_problem(price)
        if problem is not None:
            raise InvalidInput(f"price {problem}", field="price")
        if _decimal_places(price) > PRICE_DECIMAL_PLACES:
            raise InvalidInput(
                f"price has more than {PRICE_DECIMAL_PLACES} decimal places", field="price"
            )
        if at.tzinfo is None or at.utcoffset() is None:
            raise InvalidInput("time must carry a timezone", field="at")
        if not by.strip():
            raise InvalidInput("who set the price must be recorded", field="by")
        quote = PriceQuote(price_rub_per_btc=price, source=self.name, quoted_at=at)
        with self._lock:
            self._quote = quote
            self._set_by = by
        return quote

    def quote(self) -> PriceQuote:
        with self._lock:
            quote = self._quote
        if quote is None:
            raise PriceUnavailable(f"{self.name}: no price has been set")
        return quote


# --------------------------------------------------------------------------- HTTP JSON

_PathStep = str | int
_SEGMENT = re.compile(r"(?P<key>[^.\[\]]*)(?P<indexes>(\[\d+\])*)")


def parse_field_path(path: str) -> tuple[_PathStep, ...]:
    """`"data.rates.RUB"` -> ("data", "rates", "RUB"); `"result[0].price"` ->
    ("result", 0, "price"); `"[1].p"` -> (1, "p"). Keys containing dots or brackets
    are not expressible, which no price API we know of needs."""
    steps: list[_PathStep] = []
    if not path:
        raise InvalidInput("field path is empty", field="field_path")
    for position, segment in enumerate(path.split(".")):
        match = _SEGMENT.fullmatch(segment)
        if match is None:
            raise InvalidInput(f"field path {path!r}: bad segment {segment!r}", field="field_path")
        key, indexes = match.group("key"), match.group("indexes")
        if key:
            steps.append(key)
        elif not indexes or position > 0:
            # Only a leading "[0]" may stand without a key ("a..b" and "a.[0]" are typos).
            raise InvalidInput(f"field path {path!r}: empty segment", field="field_path")
        steps.extend(int(index) for index in re.findall(r"\[(\d+)\]", indexes))
    return tuple(steps)


def _format_path(steps: Sequence[_PathStep]) -> str:
    text = ""
    for step in steps:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text or "(root)"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a price can be")


class HttpJsonPriceSource:
    """One HTTP endpoint answering JSON; the price sits at `field_path`.

    Numbers are parsed straight to Decimal (`parse_float=Decimal`), so "8123456.12345678"
    stays exactly that. `quoted_at` is the answer's own timestamp at `time_path`
    (ISO-8601 with a timezone, or unix seconds) when given, else the fetch time: a feed
    that says when its price was true lets the median drop it once it goes stale.
    """

    def __init__(
        self,
        name: str,
        url: str,
        field_path: str,
        *,
        timeout: float = 5.0,
        client: httpx.Client | None = None,
        time_path: str | None = None,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        if not name:
            raise InvalidInput("a price source needs a name", field="name")
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise InvalidInput(f"{name}: not a valid URL", field="url") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise InvalidInput(f"{name}: only http(s) URLs are allowed", field="url")
        if not timeout > 0:
            raise InvalidInput(f"{name}: timeout must be positive", field="timeout")
        self.name = name
        self.url = url
        self.timeout = timeout
        self._steps = parse_field_path(field_path)
        self._time_steps = parse_field_path(time_path) if time_path is not None else None
        self._client = client
        self._clock = clock

    def quote(self) -> PriceQuote:
        fetched_at = self._clock()
        document = self._decode(self._fetch())
        price = self._price(self._walk(document, self._steps))
        quoted_at = (
            fetched_at
            if self._time_steps is None
            else self._timestamp(self._walk(document, self._time_steps))
        )
        return PriceQuote(price_rub_per_btc=price, source=self.name, quoted_at=quoted_at)

    def _unavailable(self, why: str) -> PriceUnavailable:
        return PriceUnavailable(f"{self.name}: {why}")

    def _fetch(self) -> bytes:
        if self._client is not None:
            return self._fetch_with(self._client)
        with httpx.Client(
            timeout=self.timeout, follow_redirects=False, verify=client_tls()
        ) as client:
            return self._fetch_with(client)

    def _fetch_with(self, client: httpx.Client) -> bytes:
        # httpx timeouts are per operation; the deadline also stops a server that
        # dribbles one byte at a time from holding the risk loop forever.
        deadline = time.monotonic() + self.timeout
        try:
            with client.stream(
                "GET", self.url, timeout=self.timeout, headers={"Accept": "application/json"}
            ) as response:
                if response.status_code != 200:
                    raise self._unavailable(f"HTTP {response.status_code}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise self._unavailable(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise self._unavailable(f"timed out after {self.timeout}s")
                return bytes(body)
        except httpx.TimeoutException as exc:
            raise self._unavailable(f"timed out after {self.timeout}s") from exc
        except httpx.HTTPError as exc:
            # The exception text can contain the URL; name only the kind of failure.
            raise self._unavailable(f"request failed ({type(exc).__name__})") from exc

    def _decode(self, body: bytes) -> Any:
        try:
            return json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, NaN
            raise self._unavailable("answer is not valid JSON") from exc

    def _walk(self, document: Any, steps: Sequence[_PathStep]) -> Any:
        node = document
        for depth, step in enumerate(steps):
            where = _format_path(steps[:depth])
            if isinstance(step, int):
                if not isinstance(node, list):
                    raise self._unavailable(f"expected a list at {where} for [{step}]")
                if step >= len(node):
                    raise self._unavailable(f"{_format_path(steps)} missing: {where} too short")
                node = node[step]
            else:
                if not isinstance(node, dict):
                    raise self._unavailable(f"expected an object at {where} for {step!r}")
                if step not in node:
                    raise self._unavailable(f"{_format_path(steps)} missing: no {step!r}")
                node = node[step]
        return node

    def _number(self, value: Any, what: str) -> Decimal:
        if isinstance(value, bool):  # JSON true is an int to Python
            raise self._unavailable(f"{what} is a boolean, not a number")
        if isinstance(value, Decimal):
            return value
        if isinstance(value, int):
            return Decimal(value)
        if isinstance(value, str) and _NUMERIC_STRING.fullmatch(value.strip()):
            try:
                return Decimal(value.strip())
            except InvalidOperation:  # pragma: no cover - the regex admits only numbers
                pass
        raise self._unavailable(f"{what} is not a number: {str(value)[:40]!r}")

    def _price(self, value: Any) -> Decimal:
        price = self._number(value, "price")
        problem = price_problem(price)
        if problem is not None:
            raise self._unavailable(f"price {price} {problem}")
        return price

    def _timestamp(self, value: Any) -> datetime:
        if isinstance(value, str) and not _NUMERIC_STRING.fullmatch(value.strip()):
            try:
                at = datetime.fromisoformat(value.strip())
            except ValueError as exc:
                raise self._unavailable(f"timestamp {value[:40]!r} is not ISO-8601") from exc
            if at.tzinfo is None or at.utcoffset() is None:
                # Guessing UTC vs Moscow time would shift staleness by three hours.
                raise self._unavailable(f"timestamp {value[:40]!r} has no timezone")
            return at.astimezone(UTC)
        seconds = self._number(value, "timestamp")
        try:
            return datetime.fromtimestamp(float(seconds), UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise self._unavailable(f"timestamp {seconds} is out of range") from exc


# --------------------------------------------------------------------------- median


@dataclass(frozen=True)
class Consensus:
    """What the sources agree on, or why automatic liquidation must not act.

    `quote` is None whenever `usable` is False, so a caller that forgets to check
    cannot liquidate on a price we do not trust. `quotes` are the fresh quotes the
    decision used; `failures` are "name: why" for every source left out (error or stale).
    """

    quote: PriceQuote | None
    usable: bool
    reason: str | None
    quotes: tuple[PriceQuote, ...]
    failures: tuple[str, ...]


def _percent(fraction: Decimal) -> str:
    """0.031 -> "3.1"; rounded away from zero so just-over-the-bound never prints as equal."""
    value = (fraction * 100).quantize(Decimal("0.01"), rounding=ROUND_UP)
    return f"{value.normalize():f}"


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


class MedianPriceSource:
    """The median of several sources, trusted only while enough of them are fresh and
    they agree within `max_spread_bps` of the median.

    A quote older than `max_age`, or dated more than `future_skew` ahead of our clock
    (a broken feed clock must not make a price look fresh forever), is left out.
    """

    def __init__(
        self,
        sources: Sequence[PriceSource],
        *,
        max_age: timedelta,
        max_spread_bps: int,
        min_sources: int = 1,
        clock: Callable[[], datetime] = now_utc,
        future_skew: timedelta = timedelta(seconds=30),
        name: str = "median",
    ) -> None:
        if not sources:
            raise InvalidInput("a median needs at least one source", field="sources")
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise InvalidInput("price source names must be unique", field="sources")
        if max_age <= timedelta(0):
            raise InvalidInput("max_age must be positive", field="max_age")
        if isinstance(max_spread_bps, bool) or max_spread_bps < 0:
            raise InvalidInput("max_spread_bps must be zero or more", field="max_spread_bps")
        if not 1 <= min_sources <= len(sources):
            raise InvalidInput(
                f"min_sources must be between 1 and {len(sources)}", field="min_sources"
            )
        if future_skew < timedelta(0):
            raise InvalidInput("future_skew must not be negative", field="future_skew")
        self.name = name
        self.sources = tuple(sources)
        self.max_age = max_age
        self.max_spread_bps = max_spread_bps
        self.min_sources = min_sources
        self.future_skew = future_skew
        self._clock = clock

    def _collect(self) -> tuple[list[PriceQuote], list[str]]:
        fresh: list[PriceQuote] = []
        failures: list[str] = []
        for source in self.sources:
            try:
                quote = source.quote()
            except PriceUnavailable as exc:
                failures.append(
                    exc.message
                    if exc.message.startswith(source.name)
                    else f"{source.name}: {exc.message}"
                )
                continue
            except Exception as exc:
                # A buggy source must pause liquidation, not crash the risk loop.
                log.exception("price.source_crashed", source=source.name)
                failures.append(f"{source.name}: unexpected {type(exc).__name__}")
                continue
            # Reasons stay the same from pass to pass (no growing ages in them), so a
            # caller that reports "paused because ..." once per change is not flooded.
            age = self._clock() - quote.quoted_at
            if age > self.max_age:
                failures.append(f"{source.name}: stale (older than {_age(self.max_age)})")
            elif -age > self.future_skew:
                failures.append(f"{source.name}: dated in the future")
            else:
                fresh.append(quote)
        return fresh, failures

    def consensus(self) -> Consensus:
        fresh, failures = self._collect()
        quotes, failed = tuple(fresh), tuple(failures)
        if len(fresh) < self.min_sources:
            detail = "; ".join(failures) or "no sources"
            all_stale = bool(failures) and all(": stale" in f for f in failures)
            kind = "all prices are stale" if all_stale else "not enough fresh prices"
            reason = (
                f"{kind} ({len(fresh)} of {self.min_sources} needed: {detail}): "
                "automatic liquidation paused"
            )
            return Consensus(None, False, reason, quotes, failed)

        with localcontext(prec=_EXACT_PRECISION):
            prices = sorted(q.price_rub_per_btc for q in fresh)
            middle = len(prices) // 2
            if len(prices) % 2:
                median = prices[middle]
            else:
                median = ((prices[middle - 1] + prices[middle]) / 2).quantize(
                    _PRICE_QUANTUM, rounding=ROUND_HALF_EVEN
                )
            spread = (prices[-1] - prices[0]) / median
            over_bound = spread * 10_000 > self.max_spread_bps

        if over_bound:
            bound = _percent(Decimal(self.max_spread_bps) / 10_000)
            reason = (
                f"sources disagree by {_percent(spread)}% (bound {bound}%): "
                "automatic liquidation paused"
            )
            return Consensus(None, False, reason, quotes, failed)

        names = ",".join(q.source for q in fresh)
        quote = PriceQuote(
            price_rub_per_btc=median,
            source=f"median({names})",
            quoted_at=min(q.quoted_at for q in fresh),  # as fresh as the oldest input
        )
        return Consensus(quote, True, None, quotes, failed)

    def quote(self) -> PriceQuote:
        consensus = self.consensus()
        if not consensus.usable or consensus.quote is None:
            raise PriceUnavailable(consensus.reason or "no usable price")
        return consensus.quote
