"""`pledge-hwi ...`: a miner or arbiter signs with a hardware wallet, registers the
loan's wallet on it, or checks the collateral address on its screen before depositing.

Runs on the party's own machine, not the bank's (so it is its own command, not a
`custody` subcommand), and talks to the API over HTTP(S). The PSBT the
device returns is uploaded unchanged: the API verifies every signature itself.
The API key is a bearer secret, so plain http is refused except to loopback
(`--insecure` overrides, for a lab). Errors are one readable line and a non-zero
exit; an address mismatch is shouted, because the next step would be a deposit. A
fixed-key loan is refused before the device is asked anything on every device but a
Trezor (`pledge_hwi.support`).
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

from pledge.descriptors import PARTIES, CollateralDescriptor, parse_collateral_descriptor
from pledge.errors import CustodyError
from pledge.keys import HDKey
from pledge.network import NETWORK_NAMES, NetworkName, check_network, embit_network
from pledge_hwi.support import (
    IMPORTS_A_FILE,
    NO_REGISTRATION,
    ONE_FIXED_KEY,
    REGISTERS_ON_DISPLAY,
    check_fixed_key,
    device_name,
    fixed_keys,
    psbt_has_fixed_key,
)

__all__ = ["CliError", "Deps", "DeviceLike", "app", "check_api_url", "deps"]

app = typer.Typer(
    help="Sign with a hardware wallet (HWI), register a loan's wallet on it and check "
    "collateral addresses on its screen.",
    no_args_is_help=True,
)

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PSBT_MAGIC = b"psbt\xff"
_TIMEOUT = httpx.Timeout(30.0)


class DeviceLike(Protocol):
    """What the CLI needs from a device (pledge_hwi.device.HwiDevice provides it)."""

    def identify(self) -> str: ...
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


def _summarise(psbt_b64: str, network: NetworkName, device: DeviceLike) -> None:
    """Refuse a device that cannot use the loan, else print the outputs so the person can
    compare them with the device's screen."""
    from embit.psbt import PSBT

    try:
        psbt = PSBT.from_string(psbt_b64)
    except Exception:
        raise CliError("the API sent something that is not a PSBT") from None
    if psbt_has_fixed_key(psbt):
        check_fixed_key(device.identify(), ONE_FIXED_KEY, "sign for this loan")
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
            device = deps.device_factory(net, fingerprint, device_type)
            _summarise(got["psbt"], net, device)
            signed = device.sign_psbt(got["psbt"])
            result = api.call("POST", f"/v1/signing-requests/{rid}/signatures", {"psbt": signed})
        finally:
            api.close()
        state = result.get("state") if isinstance(result, dict) else None
        typer.echo(f"signature uploaded for request {rid}" + (f" (now {state})" if state else ""))
        return 0

    _run(body)


def _loan_wallet(
    api: Api, lid: str, network: NetworkName, index: int
) -> tuple[CollateralDescriptor, str | None]:
    """The loan's descriptor (parsed here) and the API's receive address at `index`."""
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
    try:
        parsed = parse_collateral_descriptor(descriptor, network)
    except CustodyError as exc:
        raise CliError(f"the loan's descriptor is unusable here: {exc.message}") from None
    return parsed, from_api if isinstance(from_api, str) else None


def _local_address(wallet: CollateralDescriptor, index: int) -> str:
    try:
        return wallet.address(index)
    except CustodyError as exc:
        raise CliError(f"the loan's descriptor is unusable here: {exc.message}") from None


def _mismatch(what: str) -> int:
    typer.secho(
        f"MISMATCH: {what} do not agree on the collateral address. DO NOT DEPOSIT. "
        "Contact the bank.",
        err=True,
        fg=typer.colors.RED,
        bold=True,
    )
    return 1


def _display_and_compare(
    device: DeviceLike, wallet: CollateralDescriptor, index: int, from_api: str | None, local: str
) -> int:
    """Have the device show (and compute) the address at `index`; 0 only when the
    device, the API and this computer give the same one."""
    typer.echo("confirm on the device...")
    on_device = device.display_address(wallet.descriptor, index)
    typer.echo(f"device address:      {on_device}")
    if from_api == local == on_device:
        typer.secho(f"MATCH: index {index} is {on_device}", fg=typer.colors.GREEN)
        return 0
    return _mismatch("the device, the API and this computer")


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
            wallet, from_api = _loan_wallet(api, lid, net, index)
        finally:
            api.close()
        local = _local_address(wallet, index)
        device = deps.device_factory(net, fingerprint, device_type)
        check_fixed_key(device.identify(), fixed_keys(wallet), "show this loan's addresses")
        typer.echo(f"descriptor:          {wallet.descriptor}")
        typer.echo(f"API address:         {from_api or '(none handed out at this index)'}")
        typer.echo(f"computed here:       {local}")
        return _display_and_compare(device, wallet, index, from_api, local)

    _run(body)


def _print_wallet(lid: str, wallet: CollateralDescriptor) -> None:
    """The wallet as a device shows it when asked to register it: policy and keys."""
    typer.echo(f"loan {lid} wallet: 2 of 3, sorted multisig (sortedmulti), P2WSH, {wallet.network}")
    for party, key in zip(PARTIES, wallet.keys, strict=True):
        if isinstance(key, HDKey):
            typer.echo(f"  {party:<8} fingerprint {key.fingerprint}  {key.origin_path}  {key.xpub}")
        else:
            typer.echo(f"  {party:<8} fixed public key {key.public_key_hex}")


@app.command("register")
def register(
    loan_id: Annotated[str, typer.Argument(help="the loan id")],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
    insecure: Insecure = False,
    network: Network = None,
    fingerprint: Fingerprint = None,
    device_type: DeviceType = None,
) -> None:
    """Register the loan's multisig wallet on the device (Ledger, BitBox02, Jade: by
    showing receive address 0, which the device asks you to approve), or say what
    to do instead (Coldcard: import its file; Trezor: nothing to register)."""

    def body() -> int:
        lid = _check_id(loan_id, "LOAN_ID")
        api = Api(api_url, api_key, insecure)
        try:
            net = _resolve_network(network, api)
            wallet, from_api = _loan_wallet(api, lid, net, 0)
        finally:
            api.close()
        local = _local_address(wallet, 0)
        device = deps.device_factory(net, fingerprint, device_type)
        kind = device.identify()
        name = device_name(kind)
        check_fixed_key(kind, fixed_keys(wallet), "register this loan's wallet")
        _print_wallet(lid, wallet)
        typer.echo(f"API address 0:       {from_api or '(none)'}")
        typer.echo(f"computed here:       {local}")
        if from_api != local:
            return _mismatch("the API and this computer")
        if kind in REGISTERS_ON_DISPLAY:
            typer.echo(
                f"the {name} will show this wallet and ask you to approve (register) it: "
                "approve only if its keys and fingerprints are the ones above; it then "
                "shows receive address 0"
            )
            code = _display_and_compare(device, wallet, 0, from_api, local)
            if code == 0:
                typer.echo(f"the {name} has registered loan {lid}'s wallet")
            return code
        if kind in IMPORTS_A_FILE:
            typer.echo(
                f"a {name} cannot be registered through HWI: import the loan's {name} file "
                f"on the device. Download it (GET {api.base}/v1/loans/{lid}/export/coldcard), "
                "copy it to the SD card, import it on the device (Settings > Multisig Wallets "
                "> Import from File) and check that it lists the keys above. Then run "
                f"`pledge-hwi show-address {lid}` to compare address 0. Nothing was sent to "
                "the device."
            )
            return 0
        if kind in NO_REGISTRATION:
            typer.echo(
                f"a {name} needs no registration: it checks the wallet each time it shows an "
                f"address or signs. Run `pledge-hwi show-address {lid}` to see address 0 on "
                "its screen. Nothing was sent to the device."
            )
            return 0
        raise CliError(f"HWI cannot register or show a multisig wallet on a {name}")

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
        device = deps.device_factory(net, fingerprint, device_type)
        _summarise(psbt_b64, net, device)
        signed = device.sign_psbt(psbt_b64)
        data = base64.b64decode(signed) if binary else (signed + "\n").encode("ascii")
        try:
            with out_path.open("xb") as handle:
                handle.write(data)
        except OSError as exc:
            raise CliError(f"cannot write {out_path}: {exc.strerror}") from None
        typer.echo(f"signed PSBT written to {out_path}")
        return 0

    _run(body)
