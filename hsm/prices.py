"""The bank signer's own BTC/RUB price, for automatic liquidations.

Why the signer fetches the price itself: whoever controls the service could claim any
price and so "prove" that a healthy loan must be liquidated. The signer therefore asks
the feeds the bank configured (`HttpPriceSource`) and the desk quotes that two enrolled
bank staff signed (`DeskQuoteBook`), applies its own median, staleness and disagreement
rules by its own clock (`PriceOracle.fix`), and only then recomputes LTV.

This module deliberately shares no code with the service's price module: an edit in
`custody/` must never change the price the bank's key acts on.

Conventions:
- Every price is a `Decimal` parsed from the raw text (never a float), finite, at least
  `MIN_PRICE` and below `MAX_PRICE`; any doubt is a `PolicyViolation` with a stable check
  name, never a guess.
- Messages name a source, never its URL: a feed URL may carry an API key. For the same
  reason the request is sent through an httpx transport directly (the httpx `Client`
  logs every request URL at INFO) and `HttpSourceConfig`'s repr hides the URL.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from typing import Any, Final, Protocol

import httpx

from hsm.signer import PolicyViolation
from pledge.prices import MAX_PRICE, MIN_PRICE, check_quote, price_problem

__all__ = [
    "DESK_SOURCE",
    "FUTURE_SKEW",
    "MAX_PRICE",
    "MAX_RESPONSE_BYTES",
    "MIN_PRICE",
    "DeskQuoteBook",
    "HttpPriceSource",
    "HttpSourceConfig",
    "PriceFix",
    "PriceOracle",
    "Quote",
    "QuoteSource",
    "now_utc",
    "parse_sources",
]

log = logging.getLogger(__name__)

# What a price may be (MAX_PRICE, MIN_PRICE, MAX_DECIMAL_PLACES, price_problem) is the
# kernel's rule, shared with the service: pledge.prices.
FIX_DECIMAL_PLACES: Final = 8
_FIX_QUANTUM: Final = Decimal(1).scaleb(-FIX_DECIMAL_PLACES)
_EXACT_PRECISION: Final = 80  # prices have <= 30 significant digits; sums and means fit
MAX_RESPONSE_BYTES: Final = 64 * 1024  # a price answer is tiny; more is a wrong or hostile URL
MAX_TIMEOUT: Final = 60.0  # one slow feed must not hold a liquidation decision for long
FUTURE_SKEW: Final = timedelta(seconds=60)  # clock skew tolerated for quotes dated ahead
DESK_SOURCE: Final = "desk"

# A JSON number's grammar (without the sign JSON allows only as "-"), for numeric strings:
# Decimal() alone would also accept "NaN", "inf", " 1 " and "1_000".
_NUMBER_TEXT = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_HOST = re.compile(r"[A-Za-z0-9._:-]+")  # a name, IPv4 or IPv6 literal (IDNA already encoded)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def now_utc() -> datetime:
    return datetime.now(UTC)


def _aware_utc(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return value.astimezone(UTC)


def _short(value: object) -> str:
    """A bounded, quoted rendering of a refused value (a 64 KiB string must not become
    a 64 KiB log line)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _decimal_from_text(text: str) -> Decimal | None:
    """`text` as a Decimal when it is written like a JSON number, else None."""
    if not _NUMBER_TEXT.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:  # an exponent beyond what Decimal can hold
        return None


def _price_from_text(text: str) -> tuple[Decimal | None, str | None]:
    """Parse a price written as a string: (price, None) or (None, why not)."""
    price = _decimal_from_text(text)
    if price is None:
        return None, f"price {_short(text)} is not a number"
    problem = price_problem(price)
    if problem is not None:
        return None, f"price {_short(text)} {problem}"
    return price, None


def _price_str(price: Decimal) -> str:
    return str(price)  # exact and round-trips (exponent included)


# --------------------------------------------------------------------------- quotes


@dataclass(frozen=True)
class Quote:
    """RUB per BTC, who said so, and when it was true (aware, normalised to UTC)."""

    source: str
    price_rub_per_btc: Decimal
    quoted_at: datetime

    def __post_init__(self) -> None:
        at = check_quote(self.price_rub_per_btc, self.source, self.quoted_at)
        object.__setattr__(self, "quoted_at", at)

    def to_json(self) -> dict[str, str]:
        return {
            "source": self.source,
            "price_rub_per_btc": _price_str(self.price_rub_per_btc),
            "quoted_at": self.quoted_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Quote:
        _exact_keys(data, {"source", "price_rub_per_btc", "quoted_at"}, "quote")
        source = _string(data, "source", "quote")
        price, why = _price_from_text(_string(data, "price_rub_per_btc", "quote"))
        if price is None:
            raise ValueError(f"quote: {why}")
        return cls(source, price, _iso_utc(_string(data, "quoted_at", "quote"), "quote"))


def _exact_keys(data: object, keys: set[str], what: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be an object")
    if set(data) != keys:
        extra = sorted(str(k) for k in set(data) - keys)
        missing = sorted(keys - set(data))
        raise ValueError(f"{what}: unexpected keys {extra}, missing keys {missing}")


def _string(data: Mapping[str, Any], key: str, what: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise ValueError(f"{what}: {key} must be a string")
    return value


def _iso_utc(text: str, what: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{what}: {_short(text)} is not an ISO-8601 time") from exc
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{what}: {_short(text)} has no timezone")
    return at.astimezone(UTC)


class QuoteSource(Protocol):
    """What the oracle asks: `HttpPriceSource` is the one implementation."""

    @property
    def name(self) -> str: ...

    def quote(self) -> Quote: ...


# --------------------------------------------------------------------------- HTTP config


@dataclass(frozen=True)
class HttpSourceConfig:
    """One feed: GET `url`, the price at `field_path` ("data.0.price": dotted keys, a
    number steps into a list), the time it was true at `time_path` (ISO-8601 with a
    timezone, or unix seconds) or, when None, the fetch time."""

    name: str
    url: str = field(repr=False)  # may hold an API key: never in a repr or a log line
    field_path: str
    time_path: str | None = None
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError("a price source name must be 1-64 letters, digits, '.', '_' or '-'")
        if self.name == DESK_SOURCE:
            raise ValueError(f"{DESK_SOURCE!r} is reserved for signed desk quotes")
        if not isinstance(self.url, str):
            raise ValueError(f"{self.name}: url must be a string")
        try:
            parsed = httpx.URL(self.url)
        except (httpx.InvalidURL, TypeError, ValueError):
            # No chaining: the original error quotes the URL.
            raise ValueError(f"{self.name}: url is not a valid URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"{self.name}: url must be an http(s) URL with a host")
        # httpx accepts hosts like "%5B" and any port; refuse them here, not at 3 a.m.
        if not _HOST.fullmatch(parsed.raw_host.decode("ascii", "replace")) or not (
            parsed.port is None or 0 < parsed.port < 65536
        ):
            raise ValueError(f"{self.name}: url is not a valid URL")
        _path_steps(self.field_path, f"{self.name}: field_path")
        if self.time_path is not None:
            _path_steps(self.time_path, f"{self.name}: time_path")
        timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ValueError(f"{self.name}: timeout must be a number of seconds")
        if not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"{self.name}: timeout must be above 0 and at most {MAX_TIMEOUT}s")
        object.__setattr__(self, "timeout", float(timeout))


def _path_steps(path: object, what: str) -> tuple[str, ...]:
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what} must be a non-empty string")
    steps = tuple(path.split("."))
    if any(not step for step in steps):
        raise ValueError(f"{what} {path!r} has an empty segment")
    return steps


_CONFIG_KEYS: Final = frozenset({"name", "url", "field_path", "time_path", "timeout"})
_REQUIRED_KEYS: Final = frozenset({"name", "url", "field_path"})


def parse_sources(text: str) -> list[HttpSourceConfig]:
    """Parse `HSM_PRICE_SOURCES`: a JSON list of objects with `name`, `url`,
    `field_path` and optionally `time_path` and `timeout`. Errors name the entry by
    position and name, never by URL."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"price sources are not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, list):
        raise ValueError("price sources must be a JSON list of objects")
    configs: list[HttpSourceConfig] = []
    for position, entry in enumerate(data):
        where = f"price source #{position}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object")
        if isinstance(entry.get("name"), str):
            where += f" ({_short(entry['name'])})"
        unknown = sorted(set(entry) - _CONFIG_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}")
        missing = sorted(_REQUIRED_KEYS - set(entry))
        if missing:
            raise ValueError(f"{where}: missing keys {missing}")
        try:
            config = HttpSourceConfig(
                name=entry["name"],
                url=entry["url"],
                field_path=entry["field_path"],
                time_path=entry.get("time_path"),
                timeout=entry.get("timeout", 5.0),
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        configs.append(config)
    names = [config.name for config in configs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"price source names must be unique: {duplicates} repeat")
    return configs


# --------------------------------------------------------------------------- HTTP source


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a price can be")


class HttpPriceSource:
    """One JSON HTTP feed. GET only, no redirects, bounded in time and size.

    Numbers are parsed straight from the JSON text to Decimal, so "8123456.12345678"
    stays exactly that. Every failure is `PolicyViolation("price_source", "<name>: why")`.
    """

    def __init__(
        self, config: HttpSourceConfig, *, clock: Callable[[], datetime] = now_utc
    ) -> None:
        self.config = config
        self._steps = _path_steps(config.field_path, "field_path")
        self._time_steps = (
            None if config.time_path is None else _path_steps(config.time_path, "time_path")
        )
        self._clock = clock
        # The transport, not a Client: no redirects, no proxy or .netrc from the
        # environment, and no INFO log line carrying the URL. Built once: making one
        # loads the CA bundle (~30 ms), more than the fetch itself. It is thread-safe.
        self._transport = httpx.HTTPTransport(retries=0)

    @property
    def name(self) -> str:
        return self.config.name

    def __repr__(self) -> str:
        return f"HttpPriceSource({self.config.name!r})"

    def close(self) -> None:
        self._transport.close()

    def quote(self) -> Quote:
        fetched_at = self._clock()
        document = self._decode(self._fetch())
        price = self._price(self._walk(document, self._steps, self.config.field_path))
        if self._time_steps is None or self.config.time_path is None:
            quoted_at = fetched_at
        else:
            raw = self._walk(document, self._time_steps, self.config.time_path)
            quoted_at = self._timestamp(raw)
        return Quote(source=self.name, price_rub_per_btc=price, quoted_at=quoted_at)

    def _refuse(self, why: str) -> PolicyViolation:
        return PolicyViolation("price_source", f"{self.name}: {why}", field=None)

    def _fetch(self) -> bytes:
        timeout = self.config.timeout
        # Per-operation timeouts alone let a server that dribbles a byte at a time hold
        # us for ever; the deadline bounds the whole body. (The status line and headers
        # are bounded by the read timeout and h11's header size limit.)
        deadline = time.monotonic() + timeout
        request = httpx.Request(
            "GET",
            self.config.url,
            headers={"Accept": "application/json", "Accept-Encoding": "identity"},
            extensions={"timeout": httpx.Timeout(timeout).as_dict()},
        )
        try:
            response = self._transport.handle_request(request)
            try:
                return self._read(response, deadline)
            finally:
                response.close()
        except httpx.TimeoutException:
            raise self._refuse(f"timed out after {timeout}s") from None
        except httpx.HTTPError as exc:
            # The exception text may contain the URL; name only the kind of failure.
            raise self._refuse(f"request failed ({type(exc).__name__})") from None

    def _read(self, response: httpx.Response, deadline: float) -> bytes:
        status = response.status_code
        if 300 <= status < 400:
            raise self._refuse(f"HTTP {status}: redirects are not followed")
        if status != 200:
            raise self._refuse(f"HTTP {status}")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            # Decompressing would let a small answer expand past the size bound.
            raise self._refuse(f"compressed answer ({_short(encoding)}) refused")
        declared = response.headers.get("Content-Length")
        if (
            declared is not None
            and declared.strip().isdigit()
            and int(declared) > MAX_RESPONSE_BYTES
        ):
            raise self._refuse(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
        body = bytearray()
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > MAX_RESPONSE_BYTES:
                raise self._refuse(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
            if time.monotonic() > deadline:
                raise self._refuse(f"timed out after {self.config.timeout}s")
        return bytes(body)

    def _decode(self, body: bytes) -> Any:
        try:
            return json.loads(
                body,
                parse_float=Decimal,
                parse_int=Decimal,
                parse_constant=_reject_constant,
            )
        # JSONDecodeError, bad UTF-8, NaN/Infinity, deep nesting, an exponent too big
        # for Decimal (InvalidOperation is an ArithmeticError).
        except (ValueError, RecursionError, ArithmeticError):
            raise self._refuse("answer is not valid JSON") from None

    def _walk(self, document: Any, steps: Sequence[str], path: str) -> Any:
        node = document
        for depth, step in enumerate(steps):
            where = ".".join(steps[:depth]) or "the top"
            if isinstance(node, list):
                if not step.isdigit():
                    raise self._refuse(f"{path}: a list at {where}, {step!r} is no index")
                index = int(step)
                if index >= len(node):
                    raise self._refuse(f"{path} missing: the list at {where} is too short")
                node = node[index]
            elif isinstance(node, dict):
                if step not in node:
                    raise self._refuse(f"{path} missing: no {step!r} at {where}")
                node = node[step]
            else:
                raise self._refuse(f"{path} missing: {where} is not an object or a list")
        return node

    def _number(self, value: Any, what: str) -> Decimal:
        if isinstance(value, bool):  # JSON true is an int to Python
            raise self._refuse(f"{what} is a boolean, not a number")
        if isinstance(value, Decimal):  # every JSON number, via parse_float/parse_int
            return value
        if isinstance(value, str):
            number = _decimal_from_text(value)
            if number is not None:
                return number
            raise self._refuse(f"{what} {_short(value)} is not a number")
        kind = {dict: "an object", list: "a list", type(None): "null"}.get(type(value), "?")
        raise self._refuse(f"{what} is {kind}, not a number")

    def _price(self, value: Any) -> Decimal:
        price = self._number(value, "price")
        problem = price_problem(price)
        if problem is not None:
            raise self._refuse(f"price {_short(str(price))} {problem}")
        return price

    def _timestamp(self, value: Any) -> datetime:
        if isinstance(value, str):
            try:
                return _iso_utc(value, "timestamp")
            except ValueError as exc:
                raise self._refuse(str(exc)) from None
        seconds = self._number(value, "timestamp")
        try:
            if not seconds.is_finite():
                raise ValueError("not finite")
            return datetime.fromtimestamp(float(seconds), UTC)
        except (OverflowError, OSError, ValueError):
            raise self._refuse(f"timestamp {_short(str(seconds))} is out of range") from None


# --------------------------------------------------------------------------- desk quotes

_DESK_KEYS: Final = frozenset({"kind", "source", "price_rub_per_btc", "quoted_at", "expires_at"})

Verify = Callable[[Mapping[str, Any], Sequence[Any]], tuple[str, ...]]


@dataclass(frozen=True)
class _HeldDeskQuote:
    quote: Quote
    expires_at: datetime
    approved_by: tuple[str, ...]


class DeskQuoteBook:
    """The newest desk quote two enrolled bank staff signed.

    The signature check is injected (`verify`, from `hsm.approvals`): it raises
    `PolicyViolation` unless the endorsements are two distinct enrolled people, and
    returns their names. This class checks what was signed: shape, price and times.
    """

    def __init__(self, verify: Verify, max_age: timedelta) -> None:
        if max_age <= timedelta(0):
            raise ValueError("a desk quote's max_age must be positive")
        self._verify = verify
        self.max_age = max_age
        self._lock = threading.Lock()
        self._held: _HeldDeskQuote | None = None

    @staticmethod
    def _refuse(check: str, why: str) -> PolicyViolation:
        return PolicyViolation(check, f"desk quote: {why}", field="desk_quote")

    def _time(self, statement: Mapping[str, Any], key: str) -> datetime:
        value = statement[key]
        if not isinstance(value, str):
            raise self._refuse("desk_quote", f"{key} must be an ISO-8601 string")
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            raise self._refuse("desk_quote", f"{key} {_short(value)} is not ISO-8601") from None
        if at.tzinfo is None or at.utcoffset() != timedelta(0):
            # What was signed must say UTC itself, not leave the zone to a guess.
            raise self._refuse("desk_quote", f"{key} {_short(value)} is not in UTC")
        return at.astimezone(UTC)

    def submit(
        self, statement: Mapping[str, Any], endorsements: Sequence[Any], now: datetime
    ) -> Quote:
        now = _aware_utc(now, "now")
        if not isinstance(statement, Mapping):
            raise self._refuse("desk_quote", "the statement must be an object")
        statement = dict(statement)  # what is checked is exactly what verify sees
        if statement.get("kind") != "desk_quote":
            raise self._refuse(
                "desk_quote", f"kind must be 'desk_quote', not {_short(statement.get('kind'))}"
            )
        if set(statement) != _DESK_KEYS:
            extra = sorted(str(k) for k in set(statement) - _DESK_KEYS)
            missing = sorted(_DESK_KEYS - set(statement))
            raise self._refuse("desk_quote", f"unexpected keys {extra}, missing keys {missing}")
        if statement["source"] != DESK_SOURCE:
            raise self._refuse("desk_quote", f"source must be {DESK_SOURCE!r}")
        raw_price = statement["price_rub_per_btc"]
        if not isinstance(raw_price, str):
            # A JSON number may already have passed through a float on the way here.
            raise self._refuse("desk_quote", "price_rub_per_btc must be a decimal string")
        price, why = _price_from_text(raw_price)
        if price is None:
            raise self._refuse("desk_quote", str(why))
        quoted_at = self._time(statement, "quoted_at")
        expires_at = self._time(statement, "expires_at")
        if expires_at <= quoted_at:
            raise self._refuse("desk_quote", "expires_at must be after quoted_at")
        if quoted_at - now > FUTURE_SKEW:
            raise self._refuse(
                "desk_quote_future", f"quoted_at {quoted_at.isoformat()} is in the future"
            )
        if now - quoted_at > self.max_age:
            raise self._refuse(
                "desk_quote_stale",
                f"quoted_at {quoted_at.isoformat()} is older than {self.max_age}",
            )
        if expires_at <= now:
            raise self._refuse("desk_quote_expired", f"expired at {expires_at.isoformat()}")
        quote = Quote(source=DESK_SOURCE, price_rub_per_btc=price, quoted_at=quoted_at)
        self._check_not_superseded(quote)  # cheap refusal before the signature check

        approved_by = self._verify(statement, endorsements)
        names = tuple(approved_by)
        if len({n for n in names if isinstance(n, str) and n}) < 2:
            # Defence in depth: verify must raise itself, but never accept fewer than two.
            raise self._refuse("desk_quote_approvals", "needs two distinct enrolled people")

        with self._lock:
            self._check_not_superseded(quote)  # another submit may have won meanwhile
            if self._held is None or self._held.quote != quote:
                self._held = _HeldDeskQuote(quote, expires_at, names)
        log.info(
            "signer.desk_quote_accepted",
            extra={
                "price": _price_str(price),
                "quoted_at": quoted_at.isoformat(),
                "approved_by": list(names),
            },
        )
        return quote

    def _check_not_superseded(self, quote: Quote) -> None:
        held = self._held
        if held is None:
            return
        if quote.quoted_at < held.quote.quoted_at:
            raise self._refuse("desk_quote_superseded", "a newer desk quote is already held")
        if quote.quoted_at == held.quote.quoted_at and quote != held.quote:
            raise self._refuse(
                "desk_quote_superseded", "a different desk quote for the same time is already held"
            )

    def current(self, now: datetime) -> Quote | None:
        """The held quote while it is fresh and unexpired, else None."""
        now = _aware_utc(now, "now")
        with self._lock:
            held = self._held
        if held is None or now - held.quote.quoted_at > self.max_age or now >= held.expires_at:
            return None
        return held.quote

    @property
    def approved_by(self) -> tuple[str, ...]:
        """Who endorsed the held quote (for the decision record)."""
        with self._lock:
            return () if self._held is None else self._held.approved_by


# --------------------------------------------------------------------------- oracle


@dataclass(frozen=True)
class PriceFix:
    """The price the signer decided on, from which quotes, at what time by its clock.

    `left_out` holds "name: why" for every source that was not used (failed, stale,
    dated ahead, or no desk quote held), so the decision record shows the whole picture.
    """

    price_rub_per_btc: Decimal
    quotes: tuple[Quote, ...]
    at: datetime
    spread_bps: int
    left_out: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.price_rub_per_btc, Decimal):
            raise TypeError("price_rub_per_btc must be a Decimal, never a float")
        problem = price_problem(self.price_rub_per_btc)
        if problem is not None:
            raise ValueError(f"price {problem}")
        if not self.quotes:
            raise ValueError("a price fix needs at least one quote")
        if isinstance(self.spread_bps, bool) or not isinstance(self.spread_bps, int):
            raise TypeError("spread_bps must be an int")
        if self.spread_bps < 0:
            raise ValueError("spread_bps must not be negative")
        object.__setattr__(self, "at", _aware_utc(self.at, "at"))
        object.__setattr__(self, "quotes", tuple(self.quotes))
        object.__setattr__(self, "left_out", tuple(self.left_out))

    def to_json(self) -> dict[str, Any]:
        return {
            "price_rub_per_btc": _price_str(self.price_rub_per_btc),
            "quotes": [quote.to_json() for quote in self.quotes],
            "at": self.at.isoformat(),
            "spread_bps": self.spread_bps,
            "left_out": list(self.left_out),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PriceFix:
        """Strict inverse of `to_json` (ValueError on anything else): a registry row
        that was tampered with or mis-migrated must not read back as a price."""
        keys = {"price_rub_per_btc", "quotes", "at", "spread_bps", "left_out"}
        _exact_keys(data, keys, "price fix")
        price, why = _price_from_text(_string(data, "price_rub_per_btc", "price fix"))
        if price is None:
            raise ValueError(f"price fix: {why}")
        quotes = data["quotes"]
        if not isinstance(quotes, list) or not quotes:
            raise ValueError("price fix: quotes must be a non-empty list")
        spread = data["spread_bps"]
        if isinstance(spread, bool) or not isinstance(spread, int):
            raise ValueError("price fix: spread_bps must be an integer")
        left_out = data["left_out"]
        if not isinstance(left_out, list) or not all(isinstance(s, str) for s in left_out):
            raise ValueError("price fix: left_out must be a list of strings")
        return cls(
            price_rub_per_btc=price,
            quotes=tuple(Quote.from_json(quote) for quote in quotes),
            at=_iso_utc(_string(data, "at", "price fix"), "price fix"),
            spread_bps=spread,
            left_out=tuple(left_out),
        )


def _median(prices: Sequence[Decimal]) -> Decimal:
    ordered = sorted(prices)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    with localcontext(prec=_EXACT_PRECISION):
        mean = (ordered[middle - 1] + ordered[middle]) / 2  # exact: inputs are bounded
        return mean.quantize(_FIX_QUANTUM, rounding=ROUND_HALF_EVEN)


def _spread_bps(prices: Sequence[Decimal], median: Decimal) -> int:
    """(max - min) / median in bps, rounded up (so just over a bound never reads as
    equal to it), computed exactly: divmod on Decimals does not round."""
    with localcontext(prec=_EXACT_PRECISION):
        whole, rest = divmod((max(prices) - min(prices)) * 10_000, median)
    return int(whole) + (1 if rest else 0)


class PriceOracle:
    """The signer's BTC/RUB fix: median of the fresh quotes, refused when too few are
    usable or they disagree. Every refusal is a `PolicyViolation` whose check says which
    rule and whose reason names the sources and why."""

    def __init__(
        self,
        sources: Sequence[QuoteSource],
        desk: DeskQuoteBook | None,
        *,
        max_age: timedelta,
        max_spread_bps: int,
        min_sources: int = 1,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        names = [source.name for source in sources] + ([DESK_SOURCE] if desk else [])
        if not names:
            raise ValueError("a price oracle needs at least one source or a desk")
        if len(set(names)) != len(names):
            raise ValueError("price source names must be unique (and 'desk' is reserved)")
        if max_age <= timedelta(0):
            raise ValueError("max_age must be positive")
        if isinstance(max_spread_bps, bool) or not isinstance(max_spread_bps, int):
            raise ValueError("max_spread_bps must be an integer")
        if max_spread_bps < 0:
            raise ValueError("max_spread_bps must not be negative")
        if isinstance(min_sources, bool) or not 1 <= min_sources <= len(names):
            raise ValueError(f"min_sources must be between 1 and {len(names)}")
        self.sources = tuple(sources)
        self.desk = desk
        self.max_age = max_age
        self.max_spread_bps = max_spread_bps
        self.min_sources = min_sources
        self._clock = clock

    def _collect(self) -> tuple[list[Quote], list[str]]:
        quotes: list[Quote] = []
        failed: list[str] = []
        for source in self.sources:
            try:
                quotes.append(source.quote())
            except PolicyViolation as exc:
                reason = exc.reason
                failed.append(
                    reason if reason.startswith(f"{source.name}:") else f"{source.name}: {reason}"
                )
            except Exception as exc:
                # A buggy source must refuse the fix, not crash the signer. Only the type
                # is logged: an exception's text might carry the URL.
                log.error(
                    "signer.price_source_crashed",
                    extra={"source": source.name, "error": type(exc).__name__},
                )
                failed.append(f"{source.name}: unexpected {type(exc).__name__}")
        if self.desk is not None:
            desk_quote = self.desk.current(self._clock())
            if desk_quote is None:
                failed.append(f"{DESK_SOURCE}: no current desk quote")
            else:
                quotes.append(desk_quote)
        return quotes, failed

    def fix(self) -> PriceFix:
        quotes, failed = self._collect()
        at = _aware_utc(self._clock(), "the oracle's clock")
        # An empty desk is the normal state (desk quotes are occasional): not a warning.
        trouble = [f for f in failed if not f.startswith(f"{DESK_SOURCE}: no current")]
        if trouble:
            log.warning("signer.price_sources_left_out", extra={"trouble": trouble})
        need = self.min_sources
        if len(quotes) < need:
            raise PolicyViolation(
                "price_sources",
                f"only {len(quotes)} of {need} required BTC/RUB quotes: "
                + ("; ".join(failed) or "no sources"),
                field=None,
            )

        fresh: list[Quote] = []
        stale: list[str] = []
        future: list[str] = []
        for quote in quotes:
            if at - quote.quoted_at > self.max_age:
                stale.append(
                    f"{quote.source}: stale (quoted {quote.quoted_at.isoformat()}, "
                    f"older than {self.max_age})"
                )
            elif quote.quoted_at - at > FUTURE_SKEW:
                future.append(
                    f"{quote.source}: dated in the future ({quote.quoted_at.isoformat()})"
                )
            else:
                fresh.append(quote)
        left_out = tuple(failed + stale + future)
        if len(fresh) < need:
            # Name the rule that broke it: stale when dropping only the stale ones is
            # already too many, else the future-dated ones.
            stale_broke_it = not future or len(quotes) - len(stale) < need
            check = "price_stale" if stale and stale_broke_it else "price_future"
            raise PolicyViolation(
                check,
                f"only {len(fresh)} of {need} required BTC/RUB quotes are fresh: "
                + "; ".join(left_out),
                field=None,
            )

        prices = [quote.price_rub_per_btc for quote in fresh]
        median = _median(prices)
        spread_bps = _spread_bps(prices, median)
        with localcontext(prec=_EXACT_PRECISION):
            over = (max(prices) - min(prices)) * 10_000 > self.max_spread_bps * median
        if over:
            listed = ", ".join(f"{q.source}={_price_str(q.price_rub_per_btc)}" for q in fresh)
            raise PolicyViolation(
                "price_spread",
                f"BTC/RUB sources disagree by more than {self.max_spread_bps} bps "
                f"(about {spread_bps} bps around the median {_price_str(median)}): {listed}",
                field=None,
            )
        return PriceFix(
            price_rub_per_btc=median,
            quotes=tuple(fresh),
            at=at,
            spread_bps=spread_bps,
            left_out=left_out,
        )
