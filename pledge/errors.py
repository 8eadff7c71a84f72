"""Typed domain errors. Services raise these; the API maps them to HTTP once.

Each carries a stable machine-readable `code`, its HTTP `status_code`, a human message,
and where it applies the input `field` that was wrong, so a client can point at it.

The classes here are the categories (what HTTP status an error is answered with), which
the signer (`hsm/`) and the kernel raise too, plus the kernel's own named refusals. A
caller that only cares about the category catches the base (`except Conflict`); a client
tells errors apart by `code`, which names what happened. The service's named errors are
in `custody/errors.py`; every concrete error a route raises is a subclass with its own
code, and `tests/api/test_error_catalogue.py` keeps the codes unique.
"""

from __future__ import annotations

from typing import Any


class CustodyError(Exception):
    """Base of every error the service means to report to a caller."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


# -- categories -----------------------------------------------------------------------------


class InvalidInput(CustodyError):
    """A field of the request is not acceptable (its `field` says which)."""

    status_code = 422
    code = "invalid_input"


class NotAuthenticated(CustodyError):
    """No API key, or one that is unknown or disabled."""

    status_code = 401
    code = "not_authenticated"


class Forbidden(CustodyError):
    """The caller is known but may not do this."""

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


class ContentTooLarge(CustodyError):
    """The request is larger than the service reads."""

    status_code = 413
    code = "content_too_large"


class UpstreamUnavailable(CustodyError):
    """A dependency (node, HSM) could not be reached."""

    status_code = 503
    code = "upstream_unavailable"


# -- the kernel's named errors --------------------------------------------------------------


class LibraryDisagreement(CustodyError):
    """bdkpython and embit computed different results: never hand either out."""

    status_code = 500
    code = "library_disagreement"


class CollateralBelowFee(Conflict):
    """The collateral cannot pay the transaction's fee and leave an output above dust."""

    code = "collateral_below_fee"


class NothingToSell(Conflict):
    """A partial liquidation would sell nothing (LTV at or below target, or below dust)."""

    code = "nothing_to_sell"


class FullLiquidationNeeded(Conflict):
    """Restoring the target LTV takes all the collateral: only a full liquidation does."""

    code = "full_liquidation_needed"


class NoConfirmedCollateral(Conflict):
    """The loan has no confirmed collateral (nothing to move, LTV undefined)."""

    code = "no_confirmed_collateral"
