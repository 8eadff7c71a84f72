"""Typed domain errors. Services raise these; the API maps them to HTTP once.

Each carries a stable machine-readable `code`, a human message, and where it
applies the input `field` that was wrong, so a client can point at it.
"""

from __future__ import annotations


class CustodyError(Exception):
    """Base of every error the service means to report to a caller."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        body = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class InvalidInput(CustodyError):
    """The request is well-formed but its content is not acceptable."""

    status_code = 422
    code = "invalid_input"


class NotAuthenticated(CustodyError):
    status_code = 401
    code = "not_authenticated"


class Forbidden(CustodyError):
    status_code = 403
    code = "forbidden"


class NotFound(CustodyError):
    """Also used where a caller may not know a thing exists (no existence oracle)."""

    status_code = 404
    code = "not_found"


class Conflict(CustodyError):
    """The request contradicts the current state (wrong loan state, duplicate key...)."""

    status_code = 409
    code = "conflict"


class Unsupported(CustodyError):
    """The request is valid but cannot be expressed (e.g. an export format that
    cannot hold an HSM key)."""

    status_code = 422
    code = "unsupported"


class UpstreamUnavailable(CustodyError):
    """A dependency (node, HSM) could not be reached."""

    status_code = 503
    code = "upstream_unavailable"
