"""The signer's log: one JSON object per line, the same shape as the service's
(`event`, `level`, `logger`, `timestamp` and key/values; custody.logging, which hsm may
not import), and the request id the service sent (`X-Request-Id`, checked here again)
on every line written while serving that request, its decision line included.

Nothing secret is logged by the signer on purpose (the PIN, the token and the seed never
reach a logger); uvicorn's own logging configuration is off, so its lines are JSON too."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["REQUEST_ID_HEADER", "configure_logging", "request_id_from"]

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_from(value: str | None) -> str | None:
    """The caller's request id when it is short and of a safe charset, else None."""
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return None


def current_request_id() -> str | None:
    """The request id bound for the call being served (or the service's, in process)."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return value if isinstance(value, str) else None


def _drop_color_message(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """uvicorn's `extra` copy of its message with terminal colours: not for a JSON line."""
    event.pop("color_message", None)
    return event


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
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
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
