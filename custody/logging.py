"""structlog set-up: JSON lines on stderr, with no secret in any of them.

Secrets are pydantic SecretStr and are never passed to the logger on purpose; but an
exception's text can carry them (a failed INSERT's bound parameters once put a webhook
secret into the server log, with the traceback). So every line is redacted at the
logging layer, whoever wrote it: the service's structlog events (a processor, after the
traceback is formatted, so the traceback is redacted too) and the stdlib records of
uvicorn, SQLAlchemy, httpx and the rest (a record factory: it sees every record of every
logger, whatever handlers uvicorn installs later). Redacted are the values of keys named
like secrets (`secret`, `api_key`, `pin`, `token`, `authorization`, ...), in an event's
fields and in text (`secret='...'`, `"token": "..."`, `Authorization: Bearer ...`), our API
keys wherever they appear (`pc_` and 43 random characters, `custody.auth.service`), and the
bound parameters SQLAlchemy lists in an error.

Every line is one JSON object, structlog's events and stdlib records alike (uvicorn's
own logging configuration is off: `custody.api.server.uvicorn_options`), with the request
id of the request it was written for (`request_id`, from the edge, see
`accept_request_id`).
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

REDACTED = "***"

# Field names whose values are secrets, compared in lower case.
_SECRET_KEYS = frozenset(
    {
        "pin",
        "password",
        "passwd",
        "passphrase",
        "secret",
        "api_key",
        "apikey",
        "x-api-key",
        "key",
        "token",
        "authorization",
        "seed",
        "xprv",
        "cookie",
    }
)
_SECRET_SUFFIXES = ("_secret", "_token", "_password", "_passphrase", "_pin", "_api_key")

# Our API keys: "pc_" + secrets.token_urlsafe(32) (43 characters); shorter runs are the
# shown `key_prefix` (6), which is no secret.
_API_KEY = re.compile(r"\bpc_[A-Za-z0-9_-]{20,}")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_NAMES = _SECRET_KEYS | {suffix.lstrip("_") for suffix in _SECRET_SUFFIXES}
_NAMED = "|".join(sorted((re.escape(k) for k in _NAMES), key=len, reverse=True))
# `secret='x'`, `"secret": "x"`, `secret=x`, `pin: 1234`, `hsm_serve_token=...`: the value.
_KEY_VALUE = re.compile(
    rf"(?i)(\b[\w-]*(?:{_NAMED})\b['\"]?\s*[:=]\s*)"
    rf"(?:(?:bearer|basic)\s+[^\s,;&)}}\]'\"]+|'[^']*'|\"[^\"]*\"|[^\s,;&)}}\]]+)"
)
# SQLAlchemy's error text lists the statement's bound parameters (when the engine does
# not hide them) on a line of their own: `[parameters: (...)]`, up to the line's end.
_SQL_PARAMETERS = re.compile(r"\[parameters: [^\n]*")


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_KEYS or lowered.endswith(_SECRET_SUFFIXES)


def redact_text(text: str) -> str:
    """`text` with every secret-looking value replaced by `***`."""
    if not text:
        return text
    text = _SQL_PARAMETERS.sub(f"[parameters: {REDACTED}]", text)
    text = _API_KEY.sub(f"pc_{REDACTED}", text)
    text = _KEY_VALUE.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _secret_name(k) else _redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    return value


def redact_event(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The structlog processor: secret-named fields dropped, every text value scrubbed
    (the formatted traceback included: it runs after `format_exc_info`)."""
    for key in list(event):
        if _secret_name(key):
            event[key] = REDACTED
        else:
            event[key] = _redact_value(event[key])
    return event


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """A stdlib record with its message and traceback redacted, formatted here once
    (the message's arguments are merged in; the traceback is kept as `exc_text`, which
    formatters print instead of formatting `exc_info` again)."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it later, with the raw parts
        return record
    clean = redact_text(message)
    if clean != message:
        args = record.args
        if isinstance(args, tuple) and isinstance(record.msg, str):
            # Keep the arguments (uvicorn's access formatter unpacks them), redacted one
            # by one, if that is enough.
            redacted = tuple(_redact_value(a) for a in args)
            try:
                enough = redact_text(record.msg % redacted) == record.msg % redacted
            except (TypeError, ValueError):
                enough = False
            if enough:
                record.args = redacted
            else:
                record.msg, record.args = clean, None
        else:
            record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact_text(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)
    return record


class RedactingFilter(logging.Filter):
    """The same redaction as a filter, for a handler configured elsewhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_installed_factory: Callable[..., logging.LogRecord] | None = None


def _install_record_factory() -> None:
    """Every stdlib record is redacted as it is made (once per process)."""
    global _installed_factory
    current = logging.getLogRecordFactory()
    if current is _installed_factory:
        return
    previous = current

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    _installed_factory = factory


# The request id from the edge (`X-Request-Id`): a caller's own when it is short and of a
# safe charset (it is echoed, logged, written into audit data and sent to the signer),
# else one made here.
REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def accept_request_id(value: str | None) -> str:
    """The caller's request id if it is safe to carry, else a new one."""
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    """The request id bound for the request being served (structlog's contextvars, which
    follow the request into the threads its endpoint runs on), or None outside one."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return value if isinstance(value, str) else None


def json_formatter() -> logging.Formatter:
    """Stdlib records (uvicorn's, SQLAlchemy's, the signer's `hsm.*` loggers in process)
    rendered as the same JSON line as structlog's events: `event`, `level`, `logger`,
    `timestamp`, the request id bound for the request and the record's `extra` fields."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            _drop_color_message,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_event,
            structlog.processors.JSONRenderer(),
        ],
    )


def _drop_color_message(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """uvicorn's `extra` copy of its message with terminal colours: not for a JSON line."""
    event.pop("color_message", None)
    return event


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written, not when logging was configured: a
    command run inside another program (a test's CliRunner swaps stderr, then closes its
    stream) must not leave every later logger writing to a closed file."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "INFO") -> None:
    _install_record_factory()
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(json_formatter())
    logging.basicConfig(level=level, handlers=[handler])
    # One line per node RPC call drowns the watcher's own events.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    configure_structlog(level)


def configure_structlog(level: str = "INFO") -> None:
    """structlog's half of `configure_logging`: one redacted JSON line per event, a
    traceback as plain text in it. (Left unconfigured, structlog renders for a terminal
    and draws each traceback with Rich, which costs far more than the request did.)"""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_event,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
