"""`pledge-hwi ...`: a miner or arbiter signs with a hardware wallet, or checks the
collateral address on the device's screen before depositing.

Runs on the party's own machine, not the bank's (so it is its own command, not a
`custody` subcommand), and talks to the API over HTTP(S). The PSBT the
device returns is uploaded unchanged: the API verifies every signature itself.
The API key is a bearer secret, so plain http is refused except to loopback
(`--insecure` overrides, for a lab). Errors are one readable line and a non-zero
exit; an address mismatch is shouted, because the next step would be a deposit.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, NoReturn, Protocol

import httpx
import typer

from pledge.descriptors import parse_collateral_descriptor
from pledge.errors import CustodyError
from pledge.network import NETWORK_NAMES, NetworkName, check_network, embit_network

__all__ = ["CliError", "Deps", "DeviceLike", "app", "check_api_url", "deps"]

app = typer.Typer(
    help="Sign with a hardware wallet (HWI) and check collateral addresses on its screen.",
    no_args_is_help=True,
)

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PSBT_MAGIC = b"psbt\xff"
_TIMEOUT = httpx.Timeout(30.0)


class DeviceLike(Protocol):
    """What the CLI needs from a device (pledge_hwi.device.HwiDevice provides it)."""

    def sign_psbt(self, psbt_b64: str) -> str: ...
    def display_address(self, descriptor: str, index: int) -> str: ...


def _real_device(
    network: NetworkName, fingerprint: str | None, device_type: str | None
) -> DeviceLike:
    from pledge_hwi.device import HwiDevice

    return HwiDevice(network, fingerprint=fingerprint, device_type=device_type)


@dataclass
class Deps:
    """Seams for tests: the device factory and the HTTP transport (None: the network)."""

    device_factory: Callable[[NetworkName, str | None, str | None], DeviceLike] = _real_device
    transport: httpx.BaseTransport | None = None


deps = Deps()


class CliError(Exception):
    """One line for the user; the command exits non-zero."""


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


# -- options ------------------------------------------------------------------------

ApiUrl = Annotated[
    str | None,
    typer.Option("--api-url", envvar="CUSTODY_API_URL", help="API base URL", show_default=False),
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="CUSTODY_API_KEY", help="API key", show_default=False),
]
Insecure = Annotated[
    bool, typer.Option("--insecure", help="allow plain http to a non-loopback host")
]
Network = Annotated[
    str | None,
    typer.Option("--network", envvar="CUSTODY_NETWORK", help="mainnet/testnet/signet/regtest"),
]
Fingerprint = Annotated[
    str | None, typer.Option("--fingerprint", help="the device's master key fingerprint (hex)")
]
DeviceType = Annotated[
    str | None, typer.Option("--device-type", help="HWI device type (trezor, ledger, ...)")
]


def check_api_url(url: str, insecure: bool) -> str:
    """https anywhere; http only to loopback unless --insecure. Returns it without '/'."""
    try:
        parsed = httpx.URL(url)
    except Exception:
        raise CliError(f"the API URL {url!r} is not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CliError(f"the API URL must be http(s)://host[:port], got {url!r}")
    if parsed.userinfo:
        raise CliError("put the API key in CUSTODY_API_KEY, not in the URL")
    if parsed.scheme == "http" and not insecure and not _is_loopback(parsed.host):
        raise CliError(
            f"refusing plain http to {parsed.host}: the API key would cross the network in "
            "clear text. Use https, or --insecure if you really mean it"
        )
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Api:
    """The few API calls the device side needs, with errors turned into sentences."""

    def __init__(self, url: str | None, key: str | None, insecure: bool) -> None:
        if not url:
            raise CliError("no API URL: pass --api-url or set CUSTODY_API_URL")
        if not key:
            raise CliError("no API key: pass --api-key or set CUSTODY_API_KEY")
        self.base = check_api_url(url, insecure)
        self._client = httpx.Client(
            base_url=self.base,
            headers={"Authorization": f"Bearer {key}"},
            timeout=_TIMEOUT,
            transport=deps.transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._client.close()

    def call(self, method: str, path: str, json: Any = None) -> Any:
        try:
            response = self._client.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the API at {self.base}: {type(exc).__name__}") from None
        if response.status_code >= 400:
            raise CliError(f"the API refused {method} {path}: {_api_error(response)}")
        try:
            return response.json()
        except ValueError:
            raise CliError(f"the API answered {method} {path} with something not JSON") from None


def _api_error(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(body, dict) and "message" in body:
        return f"HTTP {response.status_code} {body.get('error', '')}: {body['message']}".strip()
    return f"HTTP {response.status_code}"


def _check_id(value: str, what: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise CliError(f"{what} must be 1-64 letters, digits, '-' or '_'")
    return value


def _resolve_network(option: str | None, api: Api | None) -> NetworkName:
    """--network / CUSTODY_NETWORK, else the API's; when both exist they must agree."""
    from_api: str | None = None
    if api is not None:
        health = api.call("GET", "/v1/health")
        if isinstance(health, dict) and isinstance(health.get("network"), str):
            from_api = health["network"]
    chosen = option or from_api
    if chosen is None:
        raise CliError(f"no network: pass --network ({'/'.join(NETWORK_NAMES)})")
    try:
        network = check_network(chosen)
    except CustodyError as exc:
        raise CliError(exc.message) from None
    if from_api is not None and from_api != network:
        raise CliError(f"--network is {network} but the API runs on {from_api}")
    return network


def _summarise(psbt_b64: str, network: NetworkName) -> None:
    """Print the outputs so the person can compare them with the device's screen."""
    from embit.psbt import PSBT

    try:
        psbt = PSBT.from_string(psbt_b64)
    except Exception:
        raise CliError("the API sent something that is not a PSBT") from None
    typer.echo(f"transaction {psbt.tx.txid().hex()} pays:")
    for out in psbt.outputs:
        try:
            address = out.script_pubkey.address(embit_network(network))
        except Exception:
            address = f"script {out.script_pubkey.data.hex()}"
        btc = Decimal(out.value) / 100_000_000
        typer.echo(f"  {address}  {btc:.8f} BTC ({out.value} sats)")
    typer.echo("check these on the device before approving")


def _run(body: Callable[[], int]) -> None:
    """Run a command body; every expected failure becomes one line and exit 1."""
    try:
        code = body()
    except CliError as exc:
        _fail(str(exc))
    except CustodyError as exc:  # DeviceUnavailable/Refused from pledge_hwi.device
        _fail(exc.message)
    if code:
        raise typer.Exit(code)


# -- commands -----------------------------------------------------------------------


@app.command("sign")
def sign(
    request_id: Annotated[str, typer.Argument(help="the signing request id")],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
    insecure: Insecure = False,
    network: Network = None,
    fingerprint: Fingerprint = None,
    device_type: DeviceType = None,
) -> None:
    """Download a signing request's PSBT, sign it on the device, upload the result."""

    def body() -> int:
        rid = _check_id(request_id, "REQUEST_ID")
        api = Api(api_url, api_key, insecure)
        try:
            net = _resolve_network(network, api)
            got = api.call("GET", f"/v1/signing-requests/{rid}/psbt")
            if not isinstance(got, dict) or not isinstance(got.get("psbt"), str):
                raise CliError("the API's answer has no PSBT")
            _summarise(got["psbt"], net)
            device = deps.device_factory(net, fingerprint, device_type)
            signed = device.sign_psbt(got["psbt"])
            result = api.call("POST", f"/v1/signing-requests/{rid}/signatures", {"psbt": signed})
        finally:
            api.close()
        state = result.get("state") if isinstance(result, dict) else None
        typer.echo(f"signature uploaded for request {rid}" + (f" (now {state})" if state else ""))
        return 0

    _run(body)


@app.command("show-address")
def show_address(
    loan_id: Annotated[str, typer.Argument(help="the loan id")],
    index: Annotated[int, typer.Option("--index", min=0, help="address index")] = 0,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
    insecure: Insecure = False,
    network: Network = None,
    fingerprint: Fingerprint = None,
    device_type: DeviceType = None,
) -> None:
    """Show the loan's collateral address on the device and compare it with the API's."""

    def body() -> int:
        lid = _check_id(loan_id, "LOAN_ID")
        api = Api(api_url, api_key, insecure)
        try:
            net = _resolve_network(network, api)
            loan = api.call("GET", f"/v1/loans/{lid}")
            descriptor = loan.get("descriptor") if isinstance(loan, dict) else None
            if not isinstance(descriptor, str):
                raise CliError(f"loan {lid} has no descriptor yet (are all three keys in?)")
            if index == 0:
                from_api = loan.get("collateral_address")
            else:
                rows = api.call("GET", f"/v1/loans/{lid}/addresses")
                from_api = next(
                    (
                        r.get("address")
                        for r in (rows if isinstance(rows, list) else [])
                        if isinstance(r, dict) and r.get("index") == index and not r.get("change")
                    ),
                    None,
                )
        finally:
            api.close()
        try:
            local = parse_collateral_descriptor(descriptor, net).address(index)
        except CustodyError as exc:
            raise CliError(f"the loan's descriptor is unusable here: {exc.message}") from None
        typer.echo(f"descriptor:          {descriptor}")
        typer.echo(f"API address:         {from_api or '(none handed out at this index)'}")
        typer.echo(f"computed here:       {local}")
        typer.echo("confirm on the device...")
        on_device = deps.device_factory(net, fingerprint, device_type).display_address(
            descriptor, index
        )
        typer.echo(f"device address:      {on_device}")
        if from_api == local == on_device:
            typer.secho(f"MATCH: index {index} is {on_device}", fg=typer.colors.GREEN)
            return 0
        typer.secho(
            "MISMATCH: the device, the API and this computer do not agree on the collateral "
            "address. DO NOT DEPOSIT. Contact the bank.",
            err=True,
            fg=typer.colors.RED,
            bold=True,
        )
        return 1

    _run(body)


@app.command("sign-file")
def sign_file(
    in_path: Annotated[Path, typer.Argument(metavar="IN.psbt", help="PSBT to sign")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT.psbt", help="where to write it")],
    network: Network = None,
    fingerprint: Fingerprint = None,
    device_type: DeviceType = None,
) -> None:
    """Air-gapped helper: sign a PSBT file with the device (binary or base64 kept as is)."""

    def body() -> int:
        net = _resolve_network(network, None)
        if out_path.exists():
            raise CliError(f"{out_path} exists: not overwriting it")
        try:
            raw = in_path.read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {in_path}: {exc.strerror}") from None
        binary = raw.startswith(_PSBT_MAGIC)
        if binary:
            psbt_b64 = base64.b64encode(raw).decode("ascii")
        else:
            try:
                psbt_b64 = "".join(raw.decode("ascii").split())
                base64.b64decode(psbt_b64, validate=True)
            except (UnicodeDecodeError, binascii.Error, ValueError):
                raise CliError(f"{in_path} is neither a binary nor a base64 PSBT") from None
        _summarise(psbt_b64, net)
        signed = deps.device_factory(net, fingerprint, device_type).sign_psbt(psbt_b64)
        data = base64.b64decode(signed) if binary else (signed + "\n").encode("ascii")
        try:
            with out_path.open("xb") as handle:
                handle.write(data)
        except OSError as exc:
            raise CliError(f"cannot write {out_path}: {exc.strerror}") from None
        typer.echo(f"signed PSBT written to {out_path}")
        return 0

    _run(body)
