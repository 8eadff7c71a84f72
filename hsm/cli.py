"""`hsm`: the bank's signer on its own machine.

- `hsm serve`: the signer as its own loopback HTTP process;
- `hsm enroll-bootstrap`: the first-time ceremony that enrols the first admins;
- `hsm people`: who is enrolled (names, roles, algorithms; never keys' secrets).

Configuration comes from the environment only (`HSM_*`, see `hsm.settings`; secrets never
on the command line, where `ps` shows them). The PIN and the serve token are removed from
this process's environment once read, so nothing it spawns inherits them.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Final

import typer
from pydantic import ValidationError

from hsm.approvals import People, public_key_from_text
from hsm.registry import Registry
from hsm.settings import SignerSettings
from hsm.signer import PolicyViolation, SignerError

__all__ = ["app"]

MIN_TOKEN_CHARS: Final = 32
LOOPBACK: Final = "127.0.0.1"

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The bank's HSM signer.")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"hsm: {message}", err=True)
    return typer.Exit(code=2)


def _settings() -> SignerSettings:
    try:
        return SignerSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"HSM_{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise _fail(f"bad configuration: {problems}") from None


@app.callback()
def main() -> None:
    """The bank's HSM signer."""


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="TCP port on 127.0.0.1 (HSM_PORT)")] = None,
    host: Annotated[
        str, typer.Option(help="Only 127.0.0.1 is accepted: the signer never listens outside")
    ] = LOOPBACK,
    log_level: Annotated[str, typer.Option(help="log level")] = "info",
) -> None:
    """Serve the signer's HTTP API on the loopback interface."""
    import uvicorn

    from hsm.factory import build_core
    from hsm.server import create_signer_app

    if host not in (LOOPBACK, "localhost"):
        raise _fail(f"refusing to listen on {host!r}: the signer listens on {LOOPBACK} only")
    settings = _settings()
    for name in ("HSM_PIN", "HSM_SERVE_TOKEN", "HSM_NODE_RPC_PASSWORD"):
        os.environ.pop(name, None)
    token = settings.serve_token.get_secret_value()
    if len(token) < MIN_TOKEN_CHARS:
        raise _fail(f"HSM_SERVE_TOKEN is required, at least {MIN_TOKEN_CHARS} characters")
    if not settings.pin.get_secret_value():
        raise _fail("HSM_PIN is required")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        core = build_core(settings)
    except SignerError as exc:  # messages never carry the PIN
        raise _fail(f"cannot start the signer: {exc.message}") from None
    except (ValueError, RuntimeError) as exc:
        raise _fail(f"cannot start the signer: {exc}") from None
    try:
        api = create_signer_app(core, token, max_body_bytes=settings.max_body_bytes)
        del token
        uvicorn.run(
            api,
            host=LOOPBACK,
            port=port or settings.port,
            log_level=log_level,
            server_header=False,
            timeout_graceful_shutdown=10,
        )
    finally:
        core.close()


@app.command("enroll-bootstrap")
def enroll_bootstrap(
    admin: Annotated[
        list[str],
        typer.Option(
            help="NAME:ALGORITHM:PUBLIC_KEY_FILE (ed25519 or p256, PEM or hex); two or more"
        ),
    ],
) -> None:
    """First-time ceremony, on the signer's machine: enrol the first admins (at least two).
    Afterwards every enrolment needs a statement signed by two enrolled admins."""
    settings = _settings()
    admins: list[tuple[str, str, bytes]] = []
    for spec in admin:
        name, _, rest = spec.partition(":")
        algorithm, _, path = rest.partition(":")
        if not name or not algorithm or not path:
            raise _fail(f"--admin {spec!r}: expected NAME:ALGORITHM:PUBLIC_KEY_FILE")
        try:
            text = Path(path).read_text(encoding="utf-8")
            admins.append((name, algorithm, public_key_from_text(algorithm, text)))
        except OSError as exc:
            raise _fail(f"cannot read {path}: {exc.strerror}") from None
        except PolicyViolation as exc:
            raise _fail(f"{name}: {exc.reason}") from None
    registry = Registry(settings.state_db)
    try:
        People(registry).bootstrap(admins, datetime.now(UTC))
    except PolicyViolation as exc:
        raise _fail(exc.reason) from None
    finally:
        registry.close()
    typer.echo(f"enrolled {len(admins)} admins: {', '.join(a[0] for a in admins)}")


@app.command()
def people() -> None:
    """List the people enrolled in this signer."""
    settings = _settings()
    registry = Registry(settings.state_db)
    try:
        for person in People(registry).active():
            typer.echo(f"{person.name}\t{person.role}\t{person.algorithm}")
    finally:
        registry.close()


if __name__ == "__main__":  # `python -m hsm.cli serve`, as tests start it
    app()
