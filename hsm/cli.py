"""`hsm serve`: run the bank's signer as its own loopback HTTP process.

Configuration comes from the environment only (secrets never on the command line,
where `ps` shows them):

- `HSM_MODULE` (default the Debian SoftHSM2 path), `HSM_TOKEN_LABEL` (default
  `custody-bank`), `HSM_PIN` (required): the PKCS#11 token and its user PIN;
- `HSM_SERVE_TOKEN` (required, >= 32 characters): the bearer token callers present;
- `HSM_STATE_DB` (default `./hsm-state.db`): the signer's own registry;
- `HSM_DAILY_LIMIT_SATS` (default 10 BTC), `HSM_MAX_FEE_SATS`, `HSM_MAX_FEE_RATE`
  (sat/vB): the signer's own limits, whatever the caller asks.

The PIN and the serve token are removed from this process's environment once read,
so nothing the process spawns inherits them. The server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import logging
import os
from decimal import Decimal, InvalidOperation
from typing import Annotated, Final

import typer
import uvicorn

from hsm.pkcs11_backend import Pkcs11Signer
from hsm.registry import Registry, state_db_path
from hsm.server import (
    DEFAULT_DAILY_LIMIT_SATS,
    DEFAULT_MAX_FEE_RATE,
    DEFAULT_MAX_FEE_SATS,
    create_signer_app,
)
from hsm.signer import SignerError

__all__ = ["app"]

DEFAULT_MODULE: Final = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_TOKEN_LABEL: Final = "custody-bank"
DEFAULT_PORT: Final = 8790
MIN_TOKEN_CHARS: Final = 32
LOOPBACK: Final = "127.0.0.1"

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The bank's HSM signer.")


@app.callback()
def main() -> None:
    """The bank's HSM signer (keeps `serve` a subcommand: `hsm serve`)."""


def _fail(message: str) -> typer.Exit:
    typer.echo(f"hsm serve: {message}", err=True)
    return typer.Exit(code=2)


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _fail(f"{name} must be an integer number of sats") from None
    if value < 0:
        raise _fail(f"{name} must not be negative")
    return value


def _decimal_env(name: str, default: Decimal) -> Decimal:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise _fail(f"{name} must be a number (sat/vB)") from None
    if not value.is_finite() or value <= 0:
        raise _fail(f"{name} must be a positive number")
    return value


@app.command()
def serve(
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port on 127.0.0.1")] = (
        DEFAULT_PORT
    ),
    host: Annotated[
        str, typer.Option(help="Only 127.0.0.1 is accepted: the signer never listens outside")
    ] = LOOPBACK,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the signer's HTTP API on the loopback interface."""
    if host not in (LOOPBACK, "localhost"):
        raise _fail(f"refusing to listen on {host!r}: the signer listens on {LOOPBACK} only")
    token = os.environ.pop("HSM_SERVE_TOKEN", "")
    if not token:
        raise _fail("HSM_SERVE_TOKEN is required (the bearer token callers must present)")
    if len(token) < MIN_TOKEN_CHARS:
        raise _fail(f"HSM_SERVE_TOKEN must be at least {MIN_TOKEN_CHARS} characters")
    pin = os.environ.pop("HSM_PIN", "")
    if not pin:
        raise _fail("HSM_PIN is required")
    module = os.environ.get("HSM_MODULE") or DEFAULT_MODULE
    label = os.environ.get("HSM_TOKEN_LABEL") or DEFAULT_TOKEN_LABEL
    daily_limit = _int_env("HSM_DAILY_LIMIT_SATS", DEFAULT_DAILY_LIMIT_SATS)
    max_fee = _int_env("HSM_MAX_FEE_SATS", DEFAULT_MAX_FEE_SATS)
    max_rate = _decimal_env("HSM_MAX_FEE_RATE", DEFAULT_MAX_FEE_RATE)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        signer = Pkcs11Signer(module, label, pin)
    except SignerError as exc:  # messages never carry the PIN
        raise _fail(f"cannot open the HSM token {label!r}: {exc.message}") from None
    del pin
    registry = Registry(state_db_path())
    try:
        api = create_signer_app(
            signer,
            registry,
            token,
            daily_limit,
            max_fee_sats=max_fee,
            max_fee_rate_sat_vb=max_rate,
            token_label=label,
        )
        del token
        uvicorn.run(api, host=LOOPBACK, port=port, log_level=log_level, server_header=False)
    finally:
        signer.close()
        registry.close()


if __name__ == "__main__":  # `python -m hsm.cli serve`, as tests start it
    app()
