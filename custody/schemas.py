"""Rules every request body shares. Integers are strict: a float or a string where sats or kopecks
are expected is refused, never coerced; prices are decimal strings.

Ids and text are bounded here, once, so that no request reaches a database with a value one of
them would store and the other refuse (the answer must not depend on the backend):

- an id is what a 64-bit id column holds (PostgreSQL BIGINT, SQLite INTEGER). In a body a
  value beyond it is a 422 naming the field, like any number out of its range; in a path it
  names no object, and the route answers the same 404 as for a missing one (`PathId`);
- text is trimmed, never blank, and carries no control character (NUL included: PostgreSQL
  refuses it in text, SQLite stores it), no lone surrogate and no line separator (`Text`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StrictInt,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

MAX_SATS = 21_000_000 * 100_000_000


MAX_KOPECKS = 10**17


Sats = Annotated[StrictInt, Field(gt=0, le=MAX_SATS)]


def no_float(value: object) -> object:
    """Prices arrive as strings (or integers): a JSON float has already lost digits."""
    if isinstance(value, float):
        raise ValueError("send the price as a decimal string, not a JSON number with a fraction")
    return value


Price = Annotated[Decimal, BeforeValidator(no_float), Field(gt=0, max_digits=30, decimal_places=8)]


Bps = Annotated[StrictInt, Field(gt=0, le=10_000)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- ids -------------------------------------------------------------------------------------

# What an id column holds on both databases: PostgreSQL BIGINT, SQLite INTEGER (both 64-bit).
ID_MIN = -(2**63)
ID_MAX = 2**63 - 1

# An id in a body: a row the database numbered, so positive, and never beyond the column.
# Written as bounds a float holds exactly (0 and 2^63): FastAPI's OpenAPI model keeps them
# as floats, and 2^63 - 1 would be published as 2^63, one more than is accepted.
Id = Annotated[StrictInt, Field(gt=0, lt=ID_MAX + 1)]

_INTEGER = re.compile(r"\s*[+-]?0*(\d+)\s*")


@dataclass(frozen=True)
class PathId:
    """A path id: `Annotated[int, Path(), PathId(lambda id: LoanNotFound(...))]`. An integer no
    id column can hold names no object, so it is answered with `not_found(id)`, raised as is
    (not as a validation error): the route's own 404, the same as for an id nobody has, and
    before any query could fail on it. A digit string too long for pydantic's integer parser
    is caught first, by its length."""

    not_found: Callable[[int | str], Exception]

    def _digits(self, value: object) -> object:
        match = _INTEGER.fullmatch(value) if isinstance(value, str) else None
        if match is not None and len(match.group(1)) > len(str(ID_MAX)):
            raise self.not_found(match.group(0).strip())
        return value

    def _in_range(self, value: int) -> int:
        if not ID_MIN <= value <= ID_MAX:
            raise self.not_found(value)
        return value

    def __get_pydantic_core_schema__(
        self, source: type[Any], handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_before_validator_function(
            self._digits,
            core_schema.no_info_after_validator_function(self._in_range, handler(source)),
        )


# -- text ------------------------------------------------------------------------------------

# Refused anywhere in a text field: control characters (C0 with NUL, DEL, C1), lone surrogates
# (no UTF-8 encodes them), and the line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_REFUSED_CLASS = r"\x00-\x1f\x7f-\x9f\u2028\u2029"


def refused_character(value: str) -> str | None:
    """The first character a text field may not carry, if any."""
    for char in value:
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            return char
    return None


@dataclass(frozen=True)
class Text:
    """A text field: `Annotated[str, Text(120)]`. A string (nothing coerced), at most
    `max_length` characters as sent, trimmed of surrounding whitespace (unless `trim` is
    off: a secret is kept exactly as sent), not blank, and without a refused character
    (`refused_character`). `pattern` narrows it further (checked after the rest).

    The OpenAPI document carries the same rule as a pattern, so a client (or a fuzzer)
    generating from the document knows what is accepted."""

    max_length: int
    min_length: int = 1
    trim: bool = True
    pattern: str | None = None

    def check(self, value: str) -> str:
        bad = refused_character(value.strip() if self.trim else value)
        if bad is not None:
            raise ValueError(f"must not contain control characters (found U+{ord(bad):04X})")
        if not value.strip():
            raise ValueError("must not be blank")
        if self.trim:
            value = value.strip()
        if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
            raise ValueError(f"must match {self.pattern}")
        return value

    def json_pattern(self) -> str:
        """The rule as a regular expression over the string as sent."""
        if self.pattern is not None:
            return self.pattern
        ok, word = f"[^{_REFUSED_CLASS}]", f"[^\\s{_REFUSED_CLASS}]"
        if self.trim:
            return f"^\\s*{word}(?:{ok}*{word})?\\s*$"
        return f"^{ok}*{word}{ok}*$"

    def __get_pydantic_core_schema__(
        self, source: type[Any], handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        raw = core_schema.str_schema(
            strict=True, min_length=self.min_length, max_length=self.max_length
        )
        return core_schema.no_info_after_validator_function(self.check, raw)

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["pattern"] = self.json_pattern()
        return json_schema


# A name people give something (a party, a principal, a price source).
Name = Annotated[str, Text(120)]
