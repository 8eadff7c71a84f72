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
from embit.descriptor import Descriptor as EmbitDescriptor
from embit.ec import PublicKey
from embit.networks import NETWORKS
from embit.psbt import PSBT
from embit.script import Script, multisig, p2wsh
from embit.transaction import Transaction, TransactionInput, TransactionOutput
from hwilib import commands as hwi_commands
from hwilib import errors as hwi_errors
from hwilib.common import Chain
from hwilib.descriptor import MultisigDescriptor, WSHDescriptor
from hwilib.devices.bitbox02 import Bitbox02Client
from hwilib.devices.coldcard import ColdcardClient
from hwilib.devices.jade import JadeClient
from hwilib.devices.ledger import LedgerClient
from hwilib.devices.trezor import TrezorClient
from hwilib.hwwclient import HardwareWalletClient
from hwilib.psbt import PSBT as HwiPsbt
from typer.testing import CliRunner

from custody.signing.psbt import CollateralInput, PayTo, build_psbt
from hsm.signer import SignerRefused
from pledge.descriptors import CollateralDescriptor
from pledge.keys import parse_fixed_key, parse_hd_key
from pledge_hwi import cli as hwi_cli
from pledge_hwi.cli import app as hwi_app
from pledge_hwi.cli import check_api_url
from pledge_hwi.device import HwiDevice, client_device_type, single_branch_descriptor
from pledge_hwi.errors import DeviceBusy, DeviceRefused, DeviceUnavailable
from pledge_hwi.support import REGISTERS_ON_DISPLAY, FixedKeyUnsupported, device_name
from regtest.software_signer import SoftwareHDSigner
from regtest.testkeys import make_fixed_test_key

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
    kind: str = "ledger"
    signed_inputs: list[str] = field(default_factory=list)
    returned: list[str] = field(default_factory=list)
    shown: list[tuple[str, int]] = field(default_factory=list)

    def identify(self) -> str:
        return self.kind

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


# -- register, and fixed-key loans, per device type ------------------------------------
#
# A fake per device type under the real HwiDevice and the real hwilib.commands: each one
# subclasses HWI's own client class (so the device type is found as for a real device),
# and for Ledger, BitBox02 and Jade runs HWI's own display_multisig_address over a fake
# of the vendor library below it, so those devices' own checks see our descriptor and the
# "device" registers the wallet and derives the address from what it registered.


def _p2wsh_sortedmulti(keys: list[bytes]) -> str:
    witness = multisig(2, [PublicKey.parse(k) for k in sorted(keys)])
    address: str = p2wsh(witness).address(NETWORKS["regtest"])
    return address


class FakeLedgerApp:
    """ledger_bitcoin's client, as LedgerClient.display_multisig_address uses it."""

    def __init__(self, lie: bool) -> None:
        self.lie = lie
        self.registered: list[Any] = []
        self.shown: list[tuple[int, int]] = []

    def register_wallet(self, wallet: Any) -> tuple[bytes, bytes]:
        self.registered.append(wallet)
        return b"\x00" * 32, wallet.serialize()[:32]

    def get_wallet_address(
        self, wallet: Any, hmac: bytes, change: int, index: int, display: bool
    ) -> str:
        assert display and hmac == wallet.serialize()[:32]  # only a registered wallet
        self.shown.append((change, index))
        derived = EmbitDescriptor.from_string(wallet.get_descriptor(bool(change)))
        address: str = derived.derive(index + self.lie).address(NETWORKS["regtest"])
        return address


class FakeJadeApp:
    """JadeAPI, as JadeClient.display_multisig_address uses it."""

    def __init__(self) -> None:
        self.registered: dict[str, tuple[bool, int, list[dict[str, Any]]]] = {}
        self.shown: list[list[list[int]]] = []

    def register_multisig(
        self, network: str, name: str, variant: str, is_sorted: bool, threshold: int, signers: Any
    ) -> bool:
        assert network == "localtest" and variant == "wsh(multi(k))"
        self.registered[name] = (is_sorted, threshold, signers)
        return True

    def get_receive_address(self, network: str, paths: Any, multisig_name: str) -> str:
        is_sorted, threshold, signers = self.registered[multisig_name]  # registered first
        assert is_sorted and threshold == 2
        self.shown.append(paths)
        keys = [
            bip32.HDKey.from_base58(s["xpub"]).derive(path).key.sec()
            for s, path in zip(signers, paths, strict=True)
        ]
        return _p2wsh_sortedmulti(keys)


class FakeBitBox02App:
    """bitbox02.BitBox02, as Bitbox02Client.display_multisig_address uses it."""

    def __init__(self, root: bip32.HDKey) -> None:
        self.root = root
        self.registered: list[tuple[Any, list[int]]] = []
        self.shown: list[list[int]] = []

    def root_fingerprint(self) -> bytes:
        fingerprint: bytes = self.root.my_fingerprint
        return fingerprint

    def btc_xpub(self, keypath: Any, coin: Any, xpub_type: Any, display: bool) -> str:
        xpub: str = (
            self.root.derive(list(keypath))
            .to_public()
            .to_base58(version=NETWORKS["regtest"]["xpub"])
        )
        return xpub

    def btc_is_script_config_registered(self, coin: Any, config: Any, keypath: Any) -> bool:
        return (config, list(keypath)) in self.registered

    def btc_register_script_config(
        self, coin: Any, script_config: Any, keypath: Any, name: str, xpub_type: Any
    ) -> None:
        self.registered.append((script_config, list(keypath)))

    def btc_address(self, keypath: Any, coin: Any, script_config: Any, display: bool) -> str:
        assert display and any(c == script_config for c, _ in self.registered)
        self.shown.append(list(keypath))
        change, index = list(keypath)[-2:]
        keys = [
            bip32.HDKey(PublicKey.parse(x.public_key), x.chain_code)
            .derive([change, index])
            .key.sec()
            for x in script_config.multisig.xpubs
        ]
        return _p2wsh_sortedmulti(keys)


class DeviceFake(HardwareWalletClient):
    """Mixed in before a real hwilib client class: records what HWI hands the device."""

    computes_itself = False  # True: no vendor code below; derive from what HWI passed
    client: Any  # the vendor library objects HWI's client classes talk to
    jade: Any
    bb02: Any

    def __init__(self, signer: SoftwareHDSigner, root: bip32.HDKey, lie: bool = False) -> None:
        HardwareWalletClient.__init__(self, "fake:0", None, False, Chain.REGTEST)
        self.signer, self.root = signer, root
        self.displayed: list[MultisigDescriptor] = []
        self.signed: list[HwiPsbt] = []
        self.closed = False
        self.client = FakeLedgerApp(lie)
        self.jade = FakeJadeApp()
        self.bb02 = FakeBitBox02App(root)

    def display_multisig_address(self, addr_type: Any, multisig: MultisigDescriptor) -> str:
        self.displayed.append(multisig)
        if self.computes_itself:
            address: str = Script(WSHDescriptor(multisig).expand(0).output_script).address(
                NETWORKS["regtest"]
            )
            return address
        return super().display_multisig_address(addr_type, multisig)

    def sign_tx(self, psbt: HwiPsbt) -> HwiPsbt:
        self.signed.append(psbt)
        return psbt

    def close(self) -> None:
        self.closed = True

    @property
    def registrations(self) -> int:
        return len(self.client.registered) + len(self.jade.registered) + len(self.bb02.registered)


class FakeLedger(DeviceFake, LedgerClient):
    pass


class FakeJade(DeviceFake, JadeClient):
    pass


class FakeBitBox02(DeviceFake, Bitbox02Client):
    pass


class FakeColdcard(DeviceFake, ColdcardClient):
    computes_itself = True


class FakeTrezor(DeviceFake, TrezorClient):
    computes_itself = True


FAKES: dict[str, type[DeviceFake]] = {
    "ledger": FakeLedger,
    "jade": FakeJade,
    "bitbox02": FakeBitBox02,
    "coldcard": FakeColdcard,
    "trezor": FakeTrezor,
}


@dataclass
class Plugged:
    client: DeviceFake
    opened: list[dict[str, Any]]


def plug(
    monkeypatch: pytest.MonkeyPatch, kind: str, signer: SoftwareHDSigner, lie: bool = False
) -> Plugged:
    """One device of `kind` holding `signer`'s key, as HWI's enumerate/find_device see it."""
    client = FAKES[kind](signer, signer._root, lie)
    plugged = Plugged(client, [])

    def find_device(**kw: Any) -> DeviceFake:
        plugged.opened.append(kw)
        return client

    entry = {"type": kind, "model": kind, "path": "fake:0", "fingerprint": signer.fingerprint}
    monkeypatch.setattr(hwi_commands, "find_device", find_device)
    monkeypatch.setattr(hwi_commands, "enumerate", lambda **kw: [entry])
    return plugged


@pytest.fixture
def fixed_loan(loan: Loan) -> Loan:
    """The same miner and arbiter, the bank's key a fixed public key (fixed-key mode)."""
    _, bank_hex = make_fixed_test_key(os.urandom(16), "regtest")
    hd = loan.descriptor.keys
    descriptor = CollateralDescriptor(
        (hd[0], parse_fixed_key(bank_hex, field="k"), hd[2]), "regtest"
    )
    prev = Transaction(
        vin=[TransactionInput(os.urandom(32), 0)],
        vout=[TransactionOutput(400_000, Script(descriptor.script_pubkey(0)))],
    )
    deposit = CollateralInput(prev.txid().hex(), 0, 400_000, 0, False, prev.serialize())
    psbt = build_psbt(descriptor, "regtest", [deposit], [PayTo(MINER_RETURN, 398_000, "m")])
    return Loan(loan.signers, descriptor, psbt)


def _serve(api: FakeApi, loan: Loan) -> None:
    api.descriptor, api.psbt = loan.descriptor.descriptor, loan.psbt
    api.collateral_address = loan.descriptor.address(0)


@pytest.mark.parametrize("kind", sorted(REGISTERS_ON_DISPLAY))
def test_register_shows_receive_address_0_once_with_every_origin(
    kind: str, loan: Loan, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = plug(monkeypatch, kind, loan.signers[0])
    result = run("register", "3", "--api-url", API)
    assert result.exit_code == 0, result.output
    client = device.client
    assert len(client.displayed) == 1 and client.signed == []
    multisig = client.displayed[0]  # what HWI parsed from what pledge-hwi handed it
    assert multisig.thresh == 2 and multisig.is_sorted and len(multisig.pubkeys) == 3
    keys = {k.fingerprint: k for k in loan.descriptor.hd_keys}  # HWI sorts sortedmulti's keys
    for got in multisig.pubkeys:
        assert got.origin is not None and got.extkey is not None
        key = keys.pop(got.origin.fingerprint.hex())
        assert got.origin.path == key.path
        assert got.pubkey == key.xpub
        assert got.deriv_path == "/0/0"  # receive branch, index 0
    assert keys == {}  # every key, each with its origin
    assert client.registrations == 1  # the device registered the wallet, once
    if kind == "ledger":
        (wallet,) = client.client.registered
        assert wallet.descriptor_template == "wsh(sortedmulti(2,@0/**,@1/**,@2/**))"
        assert sorted(wallet.keys_info) == sorted(
            f"[{k.fingerprint}{k.origin_path[1:].replace('h', chr(39))}]{k.xpub}"
            for k in loan.descriptor.hd_keys
        )
        assert client.client.shown == [(0, 0)]
    if kind == "jade":
        ((_, _, signers),) = client.jade.registered.values()
        assert sorted((s["fingerprint"].hex(), s["xpub"]) for s in signers) == sorted(
            (k.fingerprint, k.xpub) for k in loan.descriptor.hd_keys
        )
        assert client.jade.shown == [[[0, 0]] * 3]
    if kind == "bitbox02":
        ((_, account),) = client.bb02.registered
        assert account == loan.descriptor.hd_keys[0].path  # found its own key by origin
        assert client.bb02.shown == [[*loan.descriptor.hd_keys[0].path, 0, 0]]
    for key in loan.descriptor.hd_keys:  # what to compare on the screen
        assert key.fingerprint in result.output and key.xpub in result.output
    assert result.output.count(loan.descriptor.address(0)) >= 3  # API, here, device
    assert f"MATCH: index 0 is {loan.descriptor.address(0)}" in result.output
    assert "has registered loan 3's wallet" in result.output
    assert client.closed


@pytest.mark.parametrize(
    ("kind", "advice"),
    [
        ("coldcard", f"GET {API}/v1/loans/3/export/coldcard"),
        ("trezor", "needs no registration"),
    ],
)
def test_register_on_coldcard_and_trezor_only_advises(
    kind: str, advice: str, loan: Loan, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = plug(monkeypatch, kind, loan.signers[0])
    result = run("register", "3", "--api-url", API)
    assert result.exit_code == 0, result.output
    assert advice in result.output
    assert "pledge-hwi show-address 3" in result.output
    assert "Nothing was sent to the device" in result.output
    assert device.client.displayed == [] and device.client.signed == []
    assert device.opened == []  # told apart by HWI's enumerate: no client was even opened


def test_register_mismatch_from_the_device_or_the_api(
    loan: Loan, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    lying = plug(monkeypatch, "ledger", loan.signers[0], lie=True)
    result = run("register", "3", "--api-url", API)
    assert result.exit_code == 1
    assert "MISMATCH" in result.output and "DO NOT DEPOSIT" in result.output
    assert "has registered" not in result.output
    assert len(lying.client.displayed) == 1
    # the API's address differs from this computer's: refused before the device is asked
    api.collateral_address = loan.descriptor.address(1)
    honest = plug(monkeypatch, "ledger", loan.signers[0])
    result = run("register", "3", "--api-url", API)
    assert result.exit_code == 1
    assert "MISMATCH: the API and this computer" in result.output
    assert honest.client.displayed == []


FIXED_KEY_ADVICE = "Only a Trezor (via HWI), Bitcoin Core or BDK can use such a loan"


@pytest.mark.parametrize("kind", ["ledger", "coldcard", "bitbox02", "jade"])
@pytest.mark.parametrize("command", ["register", "show-address", "sign"])
def test_fixed_key_loans_are_refused_before_the_device_is_asked(
    kind: str,
    command: str,
    fixed_loan: Loan,
    api: FakeApi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _serve(api, fixed_loan)
    device = plug(monkeypatch, kind, fixed_loan.signers[0])
    target = "7" if command == "sign" else "3"
    result = run(command, target, "--api-url", API)
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "fixed-key mode" in text and FIXED_KEY_ADVICE in text
    assert f"a {device_name(kind)} accepts only extended keys" in text
    if command != "sign":  # from the descriptor it can say whose key it is
        assert "the bank's key is a single public key" in text
    others = {"Ledger", "Coldcard", "BitBox02", "Jade"} - {device_name(kind)}
    assert not any(name in text for name in others)  # no device it would fail on too
    assert device.client.displayed == [] and device.client.signed == []
    assert device.opened == []  # refused from HWI's enumerate entry alone
    assert api.uploaded == []
    assert "Traceback" not in result.output


@pytest.mark.parametrize("kind", ["ledger", "coldcard", "bitbox02", "jade"])
def test_hwi_device_itself_refuses_a_fixed_key_loan(
    kind: str, fixed_loan: Loan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the CLI too: the opened client's class decides, e.g. with a wrong --device-type
    or a device swapped after the check."""
    device = plug(monkeypatch, kind, fixed_loan.signers[0])
    hwi = HwiDevice("regtest", fingerprint=fixed_loan.signers[0].fingerprint)
    with pytest.raises(FixedKeyUnsupported, match="the bank's key is a single public key"):
        hwi.display_address(fixed_loan.descriptor.descriptor, 0)
    with pytest.raises(FixedKeyUnsupported, match="one of its keys is a single public key"):
        hwi.sign_psbt(fixed_loan.psbt)
    assert device.client.displayed == [] and device.client.signed == []
    assert device.client.closed


def test_a_fixed_key_loan_works_on_a_trezor(
    fixed_loan: Loan, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(api, fixed_loan)
    device = plug(monkeypatch, "trezor", fixed_loan.signers[0])
    result = run("register", "3", "--api-url", API)
    assert result.exit_code == 0, result.output
    assert "needs no registration" in result.output
    assert f"fixed public key {fixed_loan.descriptor.keys[1].descriptor_key}" in result.output
    result = run("show-address", "3", "--api-url", API)
    assert result.exit_code == 0, result.output
    assert f"MATCH: index 0 is {fixed_loan.descriptor.address(0)}" in result.output
    (multisig,) = device.client.displayed
    bank = fixed_loan.descriptor.keys[1].descriptor_key
    (bare,) = [p for p in multisig.pubkeys if p.extkey is None]  # HWI sorts the keys
    assert bare.pubkey == bank and bare.origin is None
    assert all(p.origin is not None for p in multisig.pubkeys if p.extkey is not None)


def test_the_device_type_comes_from_the_option_enumerate_or_the_client(
    loan: Loan, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = plug(monkeypatch, "jade", loan.signers[0])
    fp = loan.signers[0].fingerprint
    assert HwiDevice("regtest", device_type="trezor_t").identify() == "trezor"
    assert HwiDevice("regtest", fingerprint=fp).identify() == "jade"
    assert HwiDevice("regtest").identify() == "jade"
    assert device.opened == []
    # a locked device tells enumerate no fingerprint: the opened client's class says
    monkeypatch.setattr(hwi_commands, "enumerate", lambda **kw: [{"type": "jade"}, {}])
    assert HwiDevice("regtest", fingerprint=fp).identify() == "jade"
    assert len(device.opened) == 1 and device.client.closed
    assert client_device_type(FakeBitBox02(loan.signers[0], loan.signers[0]._root)) == "bitbox02"
    assert client_device_type(object()) == ""
