"""`custody` command line: the API, schema migrations, access bootstrap, approvals and
enrolments for the bank's signer, audit verification."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import structlog
import typer

from custody.config import Settings, get_settings
from custody.db.migrate import upgrade
from custody.db.models import Role
from custody.db.session import make_engine, transaction
from custody.logging import configure_logging
from custody.root import Root

if TYPE_CHECKING:
    from fastapi import FastAPI

log = structlog.get_logger("custody.cli")

app = typer.Typer(
    help="Pledge custody: Bitcoin loan collateral in 2-of-3 escrow.", no_args_is_help=True
)
audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
principal_app = typer.Typer(help="API users and their keys.", no_args_is_help=True)
app.add_typer(principal_app, name="principal")


def _settings() -> Settings:
    configure_logging()
    return get_settings()


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema to the latest revision."""
    settings = _settings()
    upgrade(make_engine(settings.database_url))
    typer.echo("schema is at the latest revision")


@app.command("create-admin")
def create_admin(name: Annotated[str, typer.Argument(help="the admin's name")]) -> None:
    """Create an admin principal and print its API key (shown once, stored hashed)."""
    from custody.auth.service import create_principal

    settings = _settings()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    with transaction(engine) as session:
        _, api_key = create_principal(
            session, name=name, role=Role.admin, party_id=None, actor="cli"
        )
    typer.echo(api_key)


def _principal_change(change: str, name: str) -> str | None:
    """Revoke or rotate `name`'s key in one transaction (audited, actor `cli`); the new
    key for a rotation. A refusal is printed and exits 2."""
    from custody.auth.service import revoke_principal, rotate_key
    from pledge.errors import CustodyError

    settings = _settings()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    try:
        with transaction(engine) as session:
            if change == "revoke":
                revoke_principal(session, actor="cli", name=name)
                return None
            _, api_key = rotate_key(session, actor="cli", name=name)
            return api_key
    except CustodyError as exc:
        typer.echo(f"custody principal {change}: {exc.message}", err=True)
        raise typer.Exit(code=2) from exc
    finally:
        engine.dispose()


@principal_app.command("revoke")
def principal_revoke(name: Annotated[str, typer.Argument(help="the principal's name")]) -> None:
    """Revoke a principal's API key: its next request answers 401, on every replica."""
    _principal_change("revoke", name)
    typer.echo(f"revoked the API key of {name}")


@principal_app.command("rotate")
def principal_rotate(name: Annotated[str, typer.Argument(help="the principal's name")]) -> None:
    """Give a principal a new API key and print it (shown once, stored hashed); the old
    key answers 401 from the next request on."""
    typer.echo(_principal_change("rotate", name))


@app.command()
def invite(name: Annotated[str, typer.Argument(help="the principal's name")]) -> None:
    """Print a one-time link for the principal to register a console passkey (it works
    once, within CUSTODY_CONSOLE_INVITATION_HOURS; the database keeps only its hash)."""
    from custody.console.endpoints import invitation_url
    from custody.console.service import issue_invitation
    from pledge.errors import CustodyError

    settings = _settings()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    try:
        with transaction(engine) as session:
            _, _, token = issue_invitation(
                session, actor="cli", hours=settings.console_invitation_hours, name=name
            )
    except CustodyError as exc:
        typer.echo(f"custody invite: {exc.message}", err=True)
        raise typer.Exit(code=2) from exc
    finally:
        engine.dispose()
    typer.echo(invitation_url(settings, token))


# `custody watch` exits with this when another watcher took its lease over.
LEASE_LOST_EXIT = 3


def _root() -> Root:
    return Root(_settings())


MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        help="serve this process's Prometheus metrics on 127.0.0.1 at this port "
        "(CUSTODY_METRICS_PORT)",
        min=1,
        max=65535,
    ),
]


@contextmanager
def _metrics_server(port: int | None) -> Iterator[None]:
    """This process's metrics (its default registry) over HTTP on loopback only, while
    the command runs."""
    if port is None:
        yield
        return
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr="127.0.0.1")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def api_app() -> FastAPI:
    """The app of one API worker process (uvicorn's factory when `api_workers` > 1): each
    worker builds its own parts from the same settings."""
    from custody.api.server import settle_server_process

    root = _root()
    api = root.app()
    settle_server_process(root.settings.api_gil_switch_ms)
    return api


@app.command()
def serve() -> None:
    """Run the HTTP API (loopback by default: CUSTODY_API_HOST/CUSTODY_API_PORT)."""
    import uvicorn

    from custody.api.server import multiprocess_metrics, settle_server_process, uvicorn_options

    root = _root()
    s = root.settings
    options: dict[str, Any] = {
        "host": s.api_host,
        "port": s.api_port,
        "log_level": "info",
        "access_log": s.api_access_log,
        # Past this many connections and requests in flight: an immediate 503.
        "limit_concurrency": s.api_limit_concurrency,
        **uvicorn_options(),
    }
    try:
        if s.api_workers > 1:
            root.engine  # noqa: B018 (migrate once, here, before the workers start)
            root.close()
            # A worker that has not finished starting within uvicorn's default 5 s is killed
            # and replaced, and on a loaded machine every replacement too: give it a minute.
            with multiprocess_metrics(s.api_workers):
                uvicorn.run(
                    "custody.cli:api_app",
                    factory=True,
                    workers=s.api_workers,
                    timeout_worker_healthcheck=60,
                    **options,
                )
        else:
            api = root.app()
            settle_server_process(s.api_gil_switch_ms)
            uvicorn.run(api, **options)
    finally:
        root.close()


@app.command()
def watch(
    once: Annotated[bool, typer.Option(help="apply what is there, then exit")] = False,
    metrics_port: MetricsPort = None,
) -> None:
    """Follow the node and record deposits (one watcher per database)."""
    from custody.watcher.service import LeaseLost

    root = _root()
    watcher = root.watcher()
    try:
        if once:
            watcher.acquire()
            try:
                result = watcher.step()
            finally:
                watcher.release()
            typer.echo(json.dumps(result.__dict__))
            return
        stop = threading.Event()
        _stop_on_signals(stop)
        # Unknown outcomes (a crash between a call and its record) are reconciled at start
        # and then periodically, only while this process holds the watcher's lease, in a
        # thread of their own so a slow signer never holds up the chain.
        reconciler = threading.Thread(
            target=root.reconciler().run,
            args=(stop, root.settings.reconcile_seconds),
            kwargs={"only_while": watcher.holding},
            name="reconcile",
            daemon=True,
        )
        reconciler.start()
        try:
            with _metrics_server(metrics_port or root.settings.metrics_port):
                watcher.run(stop, poll_seconds=root.settings.watch_poll_seconds)
        except LeaseLost as exc:
            # Another watcher took over: this one wrote nothing since and never will.
            # Exit non-zero; restarted, it waits for the lease like any standby.
            typer.echo(f"custody watch: {exc.message}", err=True)
            raise typer.Exit(code=LEASE_LOST_EXIT) from exc
        finally:
            stop.set()
            reconciler.join(timeout=60)
    finally:
        root.close()


@app.command()
def reconcile() -> None:
    """Reconcile once what a crash may have left half done (a request without its
    signer statement, a statement taken to the signer with no answer recorded, a ready
    request the node may already have), print what was found, exit."""
    import dataclasses

    root = _root()
    try:
        report = root.reconciler().run_once()
        typer.echo(json.dumps(dataclasses.asdict(report), default=str))
        if report.errors:
            raise typer.Exit(code=1)
    finally:
        root.close()


@app.command()
def risk(
    once: Annotated[bool, typer.Option(help="one pass, print the report, exit")] = False,
    metrics_port: MetricsPort = None,
) -> None:
    """The risk engine: LTV of every open loan at the median price; margin calls, cures,
    automatic liquidations (decided and signed by the bank's signer on its own figures)."""
    import dataclasses

    from custody.workers.service import Heartbeat

    root = _root()
    engine_ = root.risk_engine()
    try:
        if once:
            typer.echo(json.dumps(dataclasses.asdict(engine_.run_once()), default=str))
            return
        stop = threading.Event()
        _stop_on_signals(stop)
        heartbeat = Heartbeat(root.engine, "risk")
        heartbeat.start()
        try:
            with _metrics_server(metrics_port or root.settings.metrics_port):
                while not stop.is_set():
                    try:
                        report = engine_.run_once(stop=stop, progress=heartbeat.alive)
                    except Exception as exc:  # the database or a price source is away: retry
                        log.exception("risk.pass_failed")
                        heartbeat.beat(exc)
                        stop.wait(root.settings.risk_poll_seconds)
                        continue
                    heartbeat.beat()
                    if report.margin_calls or report.cured or report.liquidations or report.errors:
                        typer.echo(json.dumps(dataclasses.asdict(report), default=str))
                    stop.wait(root.settings.risk_poll_seconds)
        finally:
            heartbeat.stop()
    finally:
        root.close()


@app.command()
def notify(metrics_port: MetricsPort = None) -> None:
    """Deliver queued webhooks (signed, retried with backoff) until stopped."""
    import httpx

    from custody.netpolicy import UrlPolicy
    from custody.notify.delivery import DeliveryWorker, RetryPolicy
    from custody.workers.service import Heartbeat

    root = _root()
    stop = threading.Event()
    _stop_on_signals(stop)
    urls = UrlPolicy.for_network(root.settings.network)
    heartbeat = Heartbeat(root.engine, "notify")
    heartbeat.start()
    try:
        s = root.settings
        policy = RetryPolicy(lease_seconds=s.notify_claim_seconds)
        # No proxy from the environment: the worker connects to the address it checked.
        with (
            httpx.Client(
                timeout=s.notify_timeout_seconds, follow_redirects=False, trust_env=False
            ) as client,
            _metrics_server(metrics_port or s.metrics_port),
        ):
            worker = DeliveryWorker(root.engine, client, urls=urls, policy=policy)
            worker.run(stop, poll=1.0, beat=heartbeat.beat)
    finally:
        heartbeat.stop()
        root.close()


def _stop_on_signals(stop: threading.Event) -> None:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())


def _key_passphrase() -> bytes | None:
    import os

    value = os.environ.get("CUSTODY_KEY_PASSPHRASE")
    return value.encode() if value else None


@app.command()
def keygen(
    out: Annotated[str, typer.Option(help="where to write the private key (PEM, mode 0600)")],
) -> None:
    """Make an approval key (Ed25519) on this machine; print the public key to enrol.
    Set CUSTODY_KEY_PASSPHRASE to encrypt the file."""
    import os
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = Path(out)
    if path.exists():
        typer.echo(f"custody keygen: {out} exists; refusing to overwrite a key", err=True)
        raise typer.Exit(code=2)
    key = ed25519.Ed25519PrivateKey.generate()
    passphrase = _key_passphrase()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    typer.echo(f"ed25519 public key: {public.hex()}")


@app.command()
def approve(
    request_id: Annotated[int | None, typer.Argument(help="the signing request to approve")] = None,
    key: Annotated[str, typer.Option(help="your approval key file (PEM)")] = "",
    person: Annotated[str, typer.Option("--as", help="your name as enrolled in the signer")] = "",
    statement_id: Annotated[
        int | None, typer.Option("--statement", help="sign this signer statement instead")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask before signing")] = False,
) -> None:
    """Review and sign, on your own machine, what the bank's signer will act on.

    For a signing request the PSBT is decoded here and must say exactly what the statement
    says (txid, inputs, outputs, fee) before anything is signed. Uses CUSTODY_API_URL
    (default http://127.0.0.1:8080) and CUSTODY_API_KEY."""
    import os
    from pathlib import Path

    import httpx
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from custody.signer.review import decode_psbt, describe, mismatches
    from pledge.statements import sign_statement

    def fail(message: str) -> typer.Exit:
        typer.echo(f"custody approve: {message}", err=True)
        return typer.Exit(code=2)

    if not key or not person:
        raise fail("--key FILE and --as NAME are required")
    if (request_id is None) == (statement_id is None):
        raise fail("give a REQUEST_ID or --statement ID (one of them)")
    try:
        private = serialization.load_pem_private_key(
            Path(key).read_bytes(),
            password=_key_passphrase(),
        )
    except (OSError, ValueError, TypeError) as exc:
        raise fail(f"cannot read the key file {key}: {type(exc).__name__}") from None
    if not isinstance(private, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise fail("the key must be Ed25519 or ECDSA P-256")
    base = os.environ.get("CUSTODY_API_URL", "http://127.0.0.1:8080").rstrip("/")
    token = os.environ.get("CUSTODY_API_KEY", "")
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def get(path: str) -> dict[str, object]:
        r = client.get(path)
        if r.status_code != 200:
            raise fail(f"GET {path}: HTTP {r.status_code} {r.text[:200]}")
        body: dict[str, object] = r.json()
        return body

    lines: list[str]
    if request_id is not None:
        req = get(f"/v1/signing-requests/{request_id}")
        sid = req.get("signer_statement_id")
        if not isinstance(sid, int):
            raise fail(f"signing request {request_id} has no statement for the bank's signer")
        statement_id = sid
        view = get(f"/v1/signer-statements/{statement_id}")
        statement = view["statement"]
        assert isinstance(statement, dict)
        psbt = str(get(f"/v1/signing-requests/{request_id}/psbt")["psbt"])
        decoded = decode_psbt(psbt, str(statement.get("network")))
        problems = mismatches(statement, decoded)
        if problems:
            raise fail("the statement does not match the transaction: " + "; ".join(problems))
        listed = req.get("outputs")
        roles = {
            str(o["address"]): str(o["role"])
            for o in (listed if isinstance(listed, list) else [])
            if isinstance(o, dict)
        }
        lines = describe(statement, decoded, roles)
    else:
        view = get(f"/v1/signer-statements/{statement_id}")
        statement = view["statement"]
        assert isinstance(statement, dict)
        lines = [f"{k}: {json.dumps(v)}" for k, v in sorted(statement.items())]
    typer.echo("\n".join(lines))
    if not yes and not typer.confirm(f"sign this as {person}?"):
        raise typer.Exit(code=1)
    signature = sign_statement(private, statement)
    r = client.post(
        f"/v1/signer-statements/{statement_id}/endorsements",
        json={"person": person, "signature": signature},
    )
    if r.status_code != 200:
        raise fail(f"the service refused the signature: HTTP {r.status_code} {r.text[:300]}")
    outcome = r.json()
    typer.echo(f"signed; statement {statement_id} is {outcome['state']}")
    if outcome.get("outcome"):
        typer.echo(str(outcome["outcome"]))


@app.command()
def enroll(
    name: Annotated[str, typer.Argument(help="the person's name in the bank's signer")],
    role: Annotated[str, typer.Option(help="admin, bank_operator or bank_approver")],
    public_key: Annotated[
        str, typer.Option(help="hex of an Ed25519 or P-256 approval key (custody keygen)")
    ] = "",
    algorithm: Annotated[str, typer.Option(help="of --public-key: ed25519 or p256")] = "ed25519",
    passkey: Annotated[
        str,
        typer.Option(help="a passkey's registration (navigator.credentials.create() as JSON)"),
    ] = "",
    rp_id: Annotated[str, typer.Option(help="the passkey's relying party id (a domain)")] = "",
    origin: Annotated[
        list[str] | None, typer.Option(help="an origin the passkey may sign from (repeat)")
    ] = None,
) -> None:
    """Open the statement that enrols a person in the bank's signer, with a raw key or a
    passkey (read and checked here); two admins enrolled in the signer then sign it
    (`custody approve --statement ID`). Uses CUSTODY_API_URL and an admin's CUSTODY_API_KEY."""
    import os
    from pathlib import Path

    import httpx

    from custody.signer.passkey import enrolment_from_registration
    from pledge.errors import InvalidInput

    def fail(message: str) -> typer.Exit:
        typer.echo(f"custody enroll: {message}", err=True)
        return typer.Exit(code=2)

    if bool(public_key) == bool(passkey):
        raise fail("give --public-key HEX or --passkey FILE (one of them)")
    body: dict[str, Any] = {"name": name, "role": role}
    if passkey:
        if not rp_id or not origin:
            raise fail("a passkey needs --rp-id and at least one --origin")
        try:
            text = Path(passkey).read_text(encoding="utf-8")
        except OSError as exc:
            raise fail(f"cannot read {passkey}: {exc.strerror}") from None
        try:
            body.update(enrolment_from_registration(text, rp_id=rp_id, origins=origin))
        except InvalidInput as exc:
            raise fail(exc.message) from None
    else:
        body.update({"algorithm": algorithm, "public_key": public_key})
    base = os.environ.get("CUSTODY_API_URL", "http://127.0.0.1:8080").rstrip("/")
    token = os.environ.get("CUSTODY_API_KEY", "")
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        r = client.post("/v1/signer-people", json=body)
    if r.status_code != 201:
        raise fail(f"the service refused the enrolment: HTTP {r.status_code} {r.text[:300]}")
    view = r.json()
    typer.echo(f"enrolment of {name} ({role}, {body['algorithm']}): signer statement {view['id']}")
    if passkey:
        typer.echo(f"credential {body['credential_id']} for {rp_id} from {', '.join(origin or [])}")
    typer.echo(
        f"two signer admins sign it: custody approve --statement {view['id']} --key FILE --as NAME"
    )


proof_app = typer.Typer(
    help="Proof of collateral: build one at a height, verify one against a node.",
    no_args_is_help=True,
)
app.add_typer(proof_app, name="proof")


@proof_app.command("build")
def proof_build(
    out: Annotated[str, typer.Option("--out", help="where to write the JSON document")],
    loan: Annotated[
        int | None, typer.Option("--loan", help="only this loan's entry (and its path)")
    ] = None,
    height: Annotated[
        int | None, typer.Option("--height", help="at this block height (default: the watcher's)")
    ] = None,
) -> None:
    """Write the proof of collateral (format pledge-proof-of-collateral v1) at a height:
    outpoints, their transactions' Merkle proofs, the headers, the sum tree over loans."""
    from pathlib import Path

    from custody.proof.service import build
    from pledge.errors import CustodyError

    root = _root()
    try:
        document = build(root.engine, root.node, root.settings.network, height=height, loan_id=loan)
    except CustodyError as exc:
        typer.echo(f"custody proof build: {exc.message}", err=True)
        raise typer.Exit(code=2) from exc
    finally:
        root.close()
    Path(out).write_text(json.dumps(document, indent=1), encoding="utf-8")
    tree = document["tree"]
    typer.echo(
        f"height {document['height']} ({document['block_hash']}): {len(document['loans'])} "
        f"loan(s) shown of {tree['leaves']}, total {tree['total_sats']} sats, root {tree['root']}"
    )


@proof_app.command("control")
def proof_control(
    loan: Annotated[int, typer.Option("--loan", help="the loan whose coins the proof covers")],
    challenge: Annotated[str, typer.Option("--challenge", help="the auditor's challenge")],
    out: Annotated[str, typer.Option("--out", help="where to write the PSBT (base64)")],
) -> None:
    """Write the control proof's PSBT (BIP-127: first input the commitment to the
    challenge, one OP_RETURN output of the coins' sum), signed by the bank's signer when it
    holds the bank key; the miner or the arbiter signs it on their device, then
    `custody proof attach` puts it into a proof document."""
    from pathlib import Path

    from custody.proof.service import control_proof
    from pledge.errors import CustodyError

    root = _root()
    try:
        psbt = control_proof(
            root.engine, root.signer, root.settings.network, loan_id=loan, challenge=challenge
        )
    except CustodyError as exc:
        typer.echo(f"custody proof control: {exc.message}", err=True)
        raise typer.Exit(code=2) from exc
    finally:
        root.close()
    Path(out).write_text(psbt + "\n", encoding="utf-8")
    typer.echo(f"control proof PSBT for loan {loan} written to {out}")


@proof_app.command("attach")
def proof_attach(
    file: Annotated[str, typer.Argument(help="the proof document (JSON), rewritten in place")],
    loan: Annotated[int, typer.Option("--loan")],
    challenge: Annotated[str, typer.Option("--challenge")],
    psbt: Annotated[str, typer.Option("--psbt", help="the control proof signed by two keys")],
) -> None:
    """Put a loan's control proof into a proof document, once it holds (two valid
    signatures on every coin of the loan in the document)."""
    from pathlib import Path

    from pledge.errors import CustodyError
    from pledge.proof import attach_control_proof

    try:
        document = json.loads(Path(file).read_text(encoding="utf-8"))
        signed = Path(psbt).read_text(encoding="utf-8").strip()
        document = attach_control_proof(document, loan, challenge, signed)
    except (OSError, ValueError) as exc:
        typer.echo(f"custody proof attach: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except CustodyError as exc:
        typer.echo(f"custody proof attach: {exc.message}", err=True)
        raise typer.Exit(code=1) from None
    Path(file).write_text(json.dumps(document, indent=1), encoding="utf-8")
    typer.echo(f"control proof of loan {loan} attached")


@proof_app.command("verify")
def proof_verify(
    file: Annotated[str, typer.Argument(help="the proof document (JSON)")],
    rpc_url: Annotated[
        str | None,
        typer.Option("--rpc-url", help="the node to check against (CUSTODY_NODE_RPC_URL)"),
    ] = None,
    rpc_user: Annotated[str | None, typer.Option("--rpc-user")] = None,
    rpc_password: Annotated[
        str | None, typer.Option("--rpc-password", envvar="PROOF_RPC_PASSWORD")
    ] = None,
    leaf: Annotated[
        int | None,
        typer.Option("--leaf", help="a miner's check: only this loan, recomputed, and its path"),
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="no node: only the document's own consistency")
    ] = False,
    as_of_height: Annotated[
        bool,
        typer.Option(
            "--as-of-height",
            help="accept outpoints spent after the proof's height (judge it at that height)",
        ),
    ] = False,
    challenge: Annotated[
        str | None,
        typer.Option("--challenge", help="require each loan's control proof for this challenge"),
    ] = None,
) -> None:
    """Check a proof of collateral: each Merkle proof against its block header, the headers
    against the node, each outpoint unspent at the height, the scripts derived from the
    descriptors, the sum tree. Prints the verdict as JSON; exit 0 when it holds, 1 if not."""
    import os
    from pathlib import Path

    from custody.chain.rpc import NodeRpc
    from custody.proof.node import NodeChainView
    from pledge.errors import CustodyError
    from pledge.proof import verify_document

    try:
        document = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        typer.echo(f"custody proof verify: cannot read {file}: {exc}", err=True)
        raise typer.Exit(code=1) from None
    rpc: NodeRpc | None = None
    if not offline:
        settings = get_settings()
        rpc = NodeRpc(
            rpc_url or settings.node_rpc_url,
            rpc_user or settings.node_rpc_user,
            rpc_password
            if rpc_password is not None
            else os.environ.get("CUSTODY_NODE_RPC_PASSWORD", "")
            or settings.node_rpc_password.get_secret_value(),
        )
    try:
        verdict = verify_document(
            document,
            None if rpc is None else NodeChainView(rpc),
            leaf_of=leaf,
            as_of_height=as_of_height,
            challenge=challenge,
        )
    except CustodyError as exc:
        typer.echo(json.dumps({"ok": False, "failures": [exc.message]}))
        raise typer.Exit(code=1) from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a malformed document
        typer.echo(json.dumps({"ok": False, "failures": [f"malformed document ({exc!r})"]}))
        raise typer.Exit(code=1) from None
    finally:
        if rpc is not None:
            rpc.close()
    report = verdict.as_json()
    if offline:
        report["unchecked"] = "offline: headers, outpoints unspent (no node asked)"
    typer.echo(json.dumps(report, indent=1))
    verdict_line = "VERIFIED" if verdict.ok else "NOT VERIFIED"
    typer.echo(verdict_line + (" (offline: not compared with a node)" if offline else ""), err=True)
    if not verdict.ok:
        raise typer.Exit(code=1)


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit hash chain; exit 1 and name the first broken link if any."""
    from custody.audit.service import verify_chain

    settings = _settings()
    # A read transaction: verifying a long chain must not hold up the writers.
    with transaction(make_engine(settings.database_url), write=False) as session:
        report = verify_chain(session)
    typer.echo(json.dumps(report.as_dict()))
    if not report.ok:
        raise typer.Exit(code=1)


if __name__ == "__main__":
    app()
