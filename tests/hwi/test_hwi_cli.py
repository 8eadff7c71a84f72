"""`pledge-hwi ...` and the HWI layer under it, without a device.

Two seams: a fake device injected into the CLI (`deps.device_factory`), and a fake
hwilib *client* under the real `HwiDevice` + real `hwilib.commands`, so HWI's own
descriptor parsing, key derivation and PSBT round trip are exercised. The API is
an `httpx.MockTransport`."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from embit import bip32
from embit.networks import NETWORKS
from embit.psbt import PSBT
from embit.script import Script
from embit.transaction import Transaction, TransactionInput, TransactionOutput
from hwilib import commands as hwi_commands
from hwilib import errors as hwi_errors
from hwilib.descriptor import MultisigDescriptor, WSHDescriptor
from hwilib.psbt import PSBT as HwiPsbt
from typer.testing import CliRunner

from custody.signing.psbt import CollateralInput, PayTo, build_psbt
from hsm.signer import SignerRefused
from pledge.descriptors import CollateralDescriptor
from pledge.keys import parse_hd_key
from pledge_hwi import cli as hwi_cli
from pledge_hwi.cli import app as hwi_app
from pledge_hwi.cli import check_api_url
from pledge_hwi.device import HwiDevice, single_branch_descriptor
from pledge_hwi.errors import DeviceBusy, DeviceRefused, DeviceUnavailable
from regtest.software_signer import SoftwareHDSigner

MINER_RETURN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
API = "http://127.0.0.1:8080"
KEY = "ck_test_secret_key_value"


@dataclass
class Loan:
    signers: list[SoftwareHDSigner]
    descriptor: CollateralDescriptor
    psbt: str


def _root() -> bip32.HDKey:
    return bip32.HDKey.from_seed(os.urandom(32), version=NETWORKS["regtest"]["xprv"])


@pytest.fixture
def loan() -> Loan:
    signers = [SoftwareHDSigner(_root(), "regtest") for _ in range(3)]
    keys = [parse_hd_key(s.account_key_text(), "regtest", field="k") for s in signers]
    descriptor = CollateralDescriptor((keys[0], keys[1], keys[2]), "regtest")
    prev = Transaction(
        vin=[TransactionInput(os.urandom(32), 0)],
        vout=[TransactionOutput(400_000, Script(descriptor.script_pubkey(0)))],
    )
    deposit = CollateralInput(prev.txid().hex(), 0, 400_000, 0, False, prev.serialize())
    psbt = build_psbt(descriptor, "regtest", [deposit], [PayTo(MINER_RETURN, 398_000, "m")])
    return Loan(signers, descriptor, psbt)


# -- fakes ---------------------------------------------------------------------------


@dataclass
class FakeDevice:
    """Stands in for HwiDevice in CLI tests: signs with an embit key, shows an address."""

    signer: SoftwareHDSigner
    address: str | None = None
    error: Exception | None = None
    signed_inputs: list[str] = field(default_factory=list)
    returned: list[str] = field(default_factory=list)
    shown: list[tuple[str, int]] = field(default_factory=list)

    def sign_psbt(self, psbt_b64: str) -> str:
        if self.error:
            raise self.error
        self.signed_inputs.append(psbt_b64)
        out = self.signer.sign_psbt(psbt_b64)
        self.returned.append(out)
        return out

    def display_address(self, descriptor: str, index: int) -> str:
        if self.error:
            raise self.error
        self.shown.append((descriptor, index))
        assert self.address is not None
        return self.address


@dataclass
class FakeApi:
    """The custody API as far as the hwi commands see it."""

    psbt: str
    descriptor: str
    collateral_address: str
    addresses: list[dict[str, Any]] = field(default_factory=list)
    network: str = "regtest"
    requests: list[httpx.Request] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return httpx.Response(401, json={"error": "not_authenticated", "message": "no"})
        path, method = request.url.path, request.method
        if path == "/v1/health":
            return httpx.Response(200, json={"status": "ok", "network": self.network})
        if method == "GET" and path == "/v1/signing-requests/7/psbt":
            return httpx.Response(200, json={"psbt": self.psbt, "unsigned_txid": "x"})
        if method == "POST" and path == "/v1/signing-requests/7/signatures":
            self.uploaded.append(json.loads(request.content)["psbt"])
            return httpx.Response(200, json={"id": 7, "state": "awaiting_signatures"})
        if path == "/v1/loans/3":
            return httpx.Response(
                200,
                json={
                    "id": 3,
                    "descriptor": self.descriptor,
                    "collateral_address": self.collateral_address,
                },
            )
        if path == "/v1/loans/3/addresses":
            return httpx.Response(200, json=self.addresses)
        return httpx.Response(404, json={"error": "not_found", "message": f"{path} not found"})


@pytest.fixture
def api(loan: Loan, monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi(loan.psbt, loan.descriptor.descriptor, loan.descriptor.address(0))
    monkeypatch.setattr(hwi_cli.deps, "transport", httpx.MockTransport(fake.handler))
    for name in ("CUSTODY_API_URL", "CUSTODY_API_KEY", "CUSTODY_NETWORK"):
        monkeypatch.delenv(name, raising=False)
    return fake


def use_device(monkeypatch: pytest.MonkeyPatch, device: Any) -> list[tuple[Any, ...]]:
    made: list[tuple[Any, ...]] = []

    def factory(network: str, fingerprint: str | None, device_type: str | None) -> Any:
        made.append((network, fingerprint, device_type))
        return device

    monkeypatch.setattr(hwi_cli.deps, "device_factory", factory)
    return made


runner = CliRunner()


def run(*args: str) -> Any:
    return runner.invoke(hwi_app, list(args), env={"CUSTODY_API_KEY": KEY})


# -- sign --------------------------------------------------------------------------


def test_sign_downloads_signs_and_uploads_the_device_psbt_unchanged(
    loan: Loan, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = FakeDevice(loan.signers[0])
    made = use_device(monkeypatch, device)
    result = run("sign", "7", "--api-url", API, "--fingerprint", loan.signers[0].fingerprint)
    assert result.exit_code == 0, result.output
    assert device.signed_inputs == [loan.psbt]
    assert api.uploaded == device.returned  # byte for byte what the device returned
    assert made == [("regtest", loan.signers[0].fingerprint, None)]
    assert "signature uploaded for request 7 (now awaiting_signatures)" in result.output
    assert MINER_RETURN in result.output  # the outputs are shown before the device asks
    assert "0.00398000 BTC" in result.output
    assert KEY not in result.output
    methods = [(r.method, r.url.path) for r in api.requests]
    assert methods[-1] == ("POST", "/v1/signing-requests/7/signatures")


def test_sign_refuses_plain_http_to_a_remote_host(
    loan: Loan, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = FakeDevice(loan.signers[0])
    use_device(monkeypatch, device)
    result = run("sign", "7", "--api-url", "http://custody.bank.example:8080")
    assert result.exit_code == 1
    assert "refusing plain http to custody.bank.example" in result.output
    assert api.requests == []  # the key never left
    assert device.signed_inputs == []
    # --insecure is the explicit override
    ok = run("sign", "7", "--api-url", "http://custody.bank.example:8080", "--insecure")
    assert ok.exit_code == 0, ok.output


def test_api_url_rules() -> None:
    assert check_api_url("https://custody.bank.example/", False) == "https://custody.bank.example"
    assert check_api_url("http://127.0.0.1:9000", False) == "http://127.0.0.1:9000"
    assert check_api_url("http://localhost:9000", False) == "http://localhost:9000"
    assert check_api_url("http://[::1]:9000", False) == "http://[::1]:9000"
    for bad in ("http://10.0.0.5", "ftp://127.0.0.1", "https://user:pw@host", "not a url"):
        with pytest.raises(hwi_cli.CliError):
            check_api_url(bad, False)


def test_device_errors_surface_as_one_clear_line(
    loan: Loan, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_device(monkeypatch, FakeDevice(loan.signers[0], error=DeviceUnavailable("no device")))
    result = run("sign", "7", "--api-url", API)
    assert result.exit_code == 1
    assert "error: no device" in result.output
    assert "Traceback" not in result.output
    assert api.uploaded == []


def test_api_errors_and_missing_settings(
    loan: Loan, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_device(monkeypatch, FakeDevice(loan.signers[0]))
    result = run("sign", "8", "--api-url", API)
    assert result.exit_code == 1
    assert "HTTP 404 not_found: /v1/signing-requests/8/psbt not found" in result.output
    no_key = runner.invoke(hwi_app, ["sign", "7", "--api-url", API], env={})
    assert no_key.exit_code == 1
    assert "CUSTODY_API_KEY" in no_key.output
    bad_id = run("sign", "../admin", "--api-url", API)
    assert bad_id.exit_code == 1
    assert "REQUEST_ID" in bad_id.output
    wrong_net = run("sign", "7", "--api-url", API, "--network", "testnet")
    assert wrong_net.exit_code == 1
    assert "the API runs on regtest" in wrong_net.output


# -- show-address --------------------------------------------------------------------


def test_show_address_match(loan: Loan, api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    device = FakeDevice(loan.signers[0], address=loan.descriptor.address(0))
    use_device(monkeypatch, device)
    result = run("show-address", "3", "--api-url", API)
    assert result.exit_code == 0, result.output
    assert "MATCH" in result.output and "MISMATCH" not in result.output
    assert device.shown == [(loan.descriptor.descriptor, 0)]


def test_show_address_mismatch_is_loud(
    loan: Loan, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_device(monkeypatch, FakeDevice(loan.signers[0], address=loan.descriptor.address(1)))
    result = run("show-address", "3", "--api-url", API)
    assert result.exit_code == 1
    assert "MISMATCH" in result.output and "DO NOT DEPOSIT" in result.output
    # the API lying about the address is caught the same way
    api.collateral_address = loan.descriptor.address(5)
    use_device(monkeypatch, FakeDevice(loan.signers[0], address=loan.descriptor.address(0)))
    result = run("show-address", "3", "--api-url", API)
    assert result.exit_code == 1
    assert "DO NOT DEPOSIT" in result.output


def test_show_address_at_an_index(
    loan: Loan, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.addresses = [
        {"index": 4, "change": True, "address": loan.descriptor.address(4, True)},
        {"index": 4, "change": False, "address": loan.descriptor.address(4)},
    ]
    device = FakeDevice(loan.signers[0], address=loan.descriptor.address(4))
    use_device(monkeypatch, device)
    result = run("show-address", "3", "--index", "4", "--api-url", API)
    assert result.exit_code == 0, result.output
    assert device.shown == [(loan.descriptor.descriptor, 4)]


# -- sign-file ----------------------------------------------------------------------


def test_sign_file_keeps_the_format(
    loan: Loan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = FakeDevice(loan.signers[1])
    use_device(monkeypatch, device)
    binary_in, binary_out = tmp_path / "in.psbt", tmp_path / "out.psbt"
    binary_in.write_bytes(base64.b64decode(loan.psbt))
    result = runner.invoke(
        hwi_app, ["sign-file", str(binary_in), str(binary_out), "--network", "regtest"]
    )
    assert result.exit_code == 0, result.output
    assert binary_out.read_bytes() == base64.b64decode(device.returned[0])
    text_in, text_out = tmp_path / "in.txt", tmp_path / "out.txt"
    text_in.write_text(loan.psbt + "\n")
    result = runner.invoke(
        hwi_app, ["sign-file", str(text_in), str(text_out), "--network", "regtest"]
    )
    assert result.exit_code == 0, result.output
    assert text_out.read_text().strip() == device.returned[1]
    again = runner.invoke(
        hwi_app, ["sign-file", str(text_in), str(text_out), "--network", "regtest"]
    )
    assert again.exit_code == 1
    assert "not overwriting" in again.output
    assert len(device.returned) == 2  # the device was not asked a third time


# -- HwiDevice over the real hwilib.commands, with a fake hwilib client ----------------


class FakeHwiClient:
    """A hwilib client whose 'device' is an embit key: exercises hwilib's own PSBT
    and descriptor code on the way in and out."""

    def __init__(self, signer: SoftwareHDSigner, fail: Exception | None = None) -> None:
        self.signer = signer
        self.fail = fail
        self.closed = False

    def sign_tx(self, psbt: HwiPsbt) -> HwiPsbt:
        if self.fail:
            raise self.fail
        try:
            signed = self.signer.sign_psbt(psbt.serialize())
        except SignerRefused:  # as a real device holding none of the keys: nothing added
            return psbt
        out = HwiPsbt()
        out.deserialize(signed)
        return out

    def display_multisig_address(self, addr_type: Any, multisig: MultisigDescriptor) -> str:
        if self.fail:
            raise self.fail
        script = WSHDescriptor(multisig).expand(0).output_script
        address: str = Script(script).address(NETWORKS["regtest"])
        return address

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def hwi_client(
    loan: Loan, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[Exception | None], FakeHwiClient]]:
    clients: list[FakeHwiClient] = []

    def install(fail: Exception | None = None) -> FakeHwiClient:
        client = FakeHwiClient(loan.signers[2], fail)
        clients.append(client)
        monkeypatch.setattr(hwi_commands, "find_device", lambda **kw: client)
        monkeypatch.setattr(hwi_commands, "enumerate", lambda **kw: [{"type": "fake"}])
        return client

    yield install
    assert all(c.closed for c in clients)  # every opened client is closed again


def test_hwi_device_signs_through_hwilib(
    loan: Loan, hwi_client: Callable[[Exception | None], FakeHwiClient]
) -> None:
    hwi_client(None)
    device = HwiDevice("regtest", fingerprint=loan.signers[2].fingerprint)
    signed = device.sign_psbt(loan.psbt)
    parsed = PSBT.from_string(signed)
    assert len(parsed.inputs[0].partial_sigs) == 1
    assert parsed.tx.serialize() == PSBT.from_string(loan.psbt).tx.serialize()


def test_hwi_device_address_agrees_with_the_descriptor(
    loan: Loan, hwi_client: Callable[[Exception | None], FakeHwiClient]
) -> None:
    hwi_client(None)
    device = HwiDevice("regtest", fingerprint=loan.signers[2].fingerprint)
    for index in (0, 9):
        assert device.display_address(loan.descriptor.descriptor, index) == (
            loan.descriptor.address(index)
        )
    text = single_branch_descriptor(loan.descriptor.descriptor, "regtest", 9)
    assert "/0/9," in text and "*" not in text and "<" not in text


@pytest.mark.parametrize(
    ("error", "kind", "words"),
    [
        (hwi_errors.DeviceConnectionError("USB gone"), DeviceUnavailable, "USB gone"),
        (hwi_errors.DeviceBusyError("busy"), DeviceBusy, "busy"),
        (hwi_errors.ActionCanceledError("user said no"), DeviceRefused, "cancelled"),
        (hwi_errors.BadArgumentError("bad desc"), DeviceRefused, "bad desc"),
        (OSError("permission denied"), DeviceUnavailable, "OSError"),
    ],
)
def test_hwi_errors_are_translated_at_the_edge(
    loan: Loan,
    hwi_client: Callable[[Exception | None], FakeHwiClient],
    error: Exception,
    kind: type[Exception],
    words: str,
) -> None:
    hwi_client(error)
    device = HwiDevice("regtest", fingerprint="deadbeef")
    with pytest.raises(kind, match=words):
        device.sign_psbt(loan.psbt)
    with pytest.raises(kind, match=words):
        device.display_address(loan.descriptor.descriptor, 0)


def test_no_device_or_a_device_that_signs_nothing(
    loan: Loan, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = FakeHwiClient(SoftwareHDSigner(_root(), "regtest"))
    monkeypatch.setattr(hwi_commands, "find_device", lambda **kw: stranger)
    with pytest.raises(DeviceRefused, match="the device added no signature"):
        HwiDevice("regtest", fingerprint="deadbeef").sign_psbt(loan.psbt)
    assert stranger.closed
    monkeypatch.setattr(hwi_commands, "find_device", lambda **kw: None)
    with pytest.raises(DeviceUnavailable, match="no hardware wallet found with fingerprint"):
        HwiDevice("regtest", fingerprint="deadbeef").sign_psbt(loan.psbt)
    monkeypatch.setattr(hwi_commands, "enumerate", lambda **kw: [{}, {}])
    with pytest.raises(DeviceUnavailable, match="2 hardware wallets"):
        HwiDevice("regtest").sign_psbt(loan.psbt)
