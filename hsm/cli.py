"""`hsm`: the bank's signer on its own machine.

- `hsm serve`: the signer as its own loopback HTTP process;
- `hsm enroll-bootstrap`: the first-time ceremony that enrols the first admins;
- `hsm people`: who is enrolled (names, roles, algorithms, a passkey's credential id, rp_id
  and counter; never keys' secrets);
- `hsm seed init|backup|restore|show`: the bank seed behind every HD bank key, made in
  the token and split into SLIP-39 shares for named officers; restored into a new token
  from enough of them (`hsm.seed`, `hsm.backup`).

Configuration comes from the environment only (`HSM_*`, see `hsm.settings`; secrets never
on the command line, where `ps` shows them). The PIN and the serve token are removed from
this process's environment once read, so nothing it spawns inherits them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Final

import typer
from pydantic import ValidationError

from hsm.approvals import People, public_key_from_text
from hsm.backup import make_share_set, read_share_file, recover_seed, split_seed
from hsm.registry import Registry
from hsm.seed import BankSeed
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
    from hsm.logs import configure_logging
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
    configure_logging(log_level)
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
            log_config=None,  # its lines go through the JSON handler (hsm.logs)
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
            passkey = person.passkey
            where = (
                f"\t{passkey.credential_id}\t{passkey.rp_id}\tcounter {passkey.sign_count}"
                if passkey is not None
                else ""
            )
            typer.echo(f"{person.name}\t{person.role}\t{person.algorithm}{where}")
    finally:
        registry.close()


seed_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The bank seed: make it, back it up as SLIP-39 shares, restore it into a new token.",
)
app.add_typer(seed_app, name="seed")

Officers = Annotated[
    list[str], typer.Option("--officer", help="an officer who keeps one share (repeat, 2-16)")
]
Threshold = Annotated[int, typer.Option(help="how many shares restore the seed (at least 2)")]
OutDir = Annotated[Path, typer.Option("--out", help="folder for the share files (removable media)")]


@contextmanager
def _seed() -> Iterator[tuple[BankSeed, Registry]]:
    """The seed over the configured token and registry; the PIN leaves the environment."""
    from hsm.pkcs11_backend import Pkcs11Signer

    settings = _settings()
    os.environ.pop("HSM_PIN", None)
    if not settings.pin.get_secret_value():
        raise _fail("HSM_PIN is required")
    try:
        token = Pkcs11Signer(settings.module, settings.token_label, settings.pin)
    except SignerError as exc:
        raise _fail(f"cannot open the token: {exc.message}") from None
    registry = Registry(settings.state_db)
    try:
        yield BankSeed(token, registry, settings.network), registry
    except PolicyViolation as exc:
        raise _fail(exc.reason) from None
    except SignerError as exc:
        raise _fail(exc.message) from None
    finally:
        registry.close()
        token.close()


def _backup(
    seed: BankSeed, registry: Registry, officers: list[str], threshold: int, out: Path
) -> None:
    paths = make_share_set(seed, registry, officers, threshold, out)
    typer.echo(f"{threshold} of {len(paths)} SLIP-39 shares written, one file per officer:")
    for officer, path in zip(officers, paths, strict=True):
        typer.echo(f"  {officer}: {path}")
    typer.echo("Hand each file to its officer; copy to paper or steel; then delete the files.")


@seed_app.command("init")
def seed_init(officer: Officers, threshold: Threshold, out: OutDir) -> None:
    """Make the bank seed in the token (its random generator), seal it under a new AES key
    that never leaves the token, and split it into shares for the officers at once."""
    with _seed() as (seed, registry):
        split_seed(b"\0" * 32, threshold, officer)  # refuse bad names before making anything
        fingerprint = seed.create()
        typer.echo(f"bank seed made in the token: fingerprint {fingerprint}")
        _backup(seed, registry, officer, threshold, out)


@seed_app.command("backup")
def seed_backup(officer: Officers, threshold: Threshold, out: OutDir) -> None:
    """A new share set of the existing seed (officers changed, a share was lost)."""
    with _seed() as (seed, registry):
        _backup(seed, registry, officer, threshold, out)


@seed_app.command("restore")
def seed_restore(
    share: Annotated[list[Path], typer.Argument(help="share files (enough of one set)")],
) -> None:
    """Restore the bank seed from shares into this (new) token: a new AES key is made in it
    and the seed sealed under it. Shares of another bank are refused (fingerprint check)."""
    mnemonics = []
    for path in share:
        try:
            mnemonics.append(read_share_file(path))
        except PolicyViolation as exc:
            raise _fail(exc.reason) from None
    with _seed() as (seed, _):
        try:
            secret = recover_seed(mnemonics)
        except PolicyViolation as exc:
            raise _fail(exc.reason) from None
        try:
            fingerprint = seed.restore(secret)
        finally:
            for i in range(len(secret)):
                secret[i] = 0
    typer.echo(f"bank seed {fingerprint} restored and sealed in this token")


@seed_app.command("show")
def seed_show() -> None:
    """The seed's fingerprint, its AES key's attributes on the token, its share sets."""
    with _seed() as (seed, registry):
        fingerprint = seed.fingerprint
        if fingerprint is None:
            typer.echo("no bank seed yet: `hsm seed init --officer ... --threshold M --out DIR`")
            return
        evidence = seed.key_evidence()
        typer.echo(f"fingerprint:        {fingerprint}")
        typer.echo(
            f"AES key {evidence.label}: never_extractable={evidence.never_extractable} "
            f"always_sensitive={evidence.always_sensitive} local={evidence.local}"
        )
        for fp, threshold, officers, at in registry.backups():
            typer.echo(
                f"share set {at.isoformat()}: {threshold} of {len(officers)} "
                f"({', '.join(officers)}) {fp}"
            )


if __name__ == "__main__":  # `python -m hsm.cli serve`, as tests start it
    app()
