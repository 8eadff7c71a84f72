"""Hardware wallets over USB, through HWI (hwilib).

Deliberately thin: HWI already has one client per device; this wrapper picks the
device, speaks the service's vocabulary (network names, collateral descriptors)
and translates HWI's errors at the edge into `pledge_hwi.errors`, so the CLI
prints one clear sentence instead of a device library's traceback.

What is checked here, because a device or its library could get it wrong: the
PSBT a device returns must have exactly the unsigned transaction it was given,
and it must carry at least one new signature. And, on the client HWI actually opened,
that the device can use the loan at all (`pledge_hwi.support.check_fixed_key`), before
anything about the loan is sent to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from embit.psbt import PSBT

from pledge.descriptors import add_checksum, parse_collateral_descriptor
from pledge.errors import CustodyError
from pledge.keys import HDKey
from pledge.network import NetworkName, check_network
from pledge_hwi.errors import DeviceBusy, DeviceError, DeviceRefused, DeviceUnavailable
from pledge_hwi.support import (
    ONE_FIXED_KEY,
    check_fixed_key,
    fixed_keys,
    normalise_device_type,
    psbt_has_fixed_key,
)

__all__ = ["HwiDevice", "client_device_type", "single_branch_descriptor", "translate_hwi_error"]


def _chain(network: NetworkName) -> Any:
    from hwilib.common import Chain

    chains = {
        "mainnet": Chain.MAIN,
        "testnet": Chain.TEST,
        "signet": Chain.SIGNET,
        "regtest": Chain.REGTEST,
    }
    return chains[check_network(network)]


def translate_hwi_error(exc: BaseException, what: str) -> DeviceError:
    """Map an HWI (or USB) exception to DeviceUnavailable/Busy/Refused/Error."""
    from hwilib import errors as e

    detail = exc.get_msg() if isinstance(exc, e.HWWError) else type(exc).__name__
    text = f"{what}: {detail}"
    if isinstance(exc, e.DeviceBusyError):
        return DeviceBusy(text)
    if isinstance(
        exc,
        e.DeviceConnectionError
        | e.DeviceNotReadyError
        | e.NoPasswordError
        | e.UnknownDeviceError
        | e.NeedsRootError
        | e.DeviceAlreadyUnlockedError,
    ):
        return DeviceUnavailable(text)
    if isinstance(exc, e.ActionCanceledError):
        return DeviceRefused(f"{what}: cancelled on the device")
    if isinstance(
        exc,
        e.BadArgumentError
        | e.PSBTSerializationError
        | e.UnavailableActionError
        | e.NotImplementedError,
    ):
        return DeviceRefused(text)
    if isinstance(exc, OSError | ConnectionError | TimeoutError):
        return DeviceUnavailable(text)
    return DeviceError(text)


def client_device_type(client: object) -> str:
    """HWI's device type of an opened client (`LedgerClient` -> `ledger`), by HWI's own
    naming rule (`commands.get_client` builds the class name from the type); "" when
    it is no hwilib device client."""
    for klass in type(client).__mro__:
        if klass.__module__.startswith("hwilib.devices.") and klass.__name__.endswith("Client"):
            return klass.__name__.removesuffix("Client").lower()
    return ""


def single_branch_descriptor(descriptor: str, network: NetworkName, index: int) -> str:
    """The receive-branch descriptor at one index, no wildcard or multipath:
    `wsh(sortedmulti(2,[fp/48h/1h/0h/2h]tpub.../0/7,02ab..,...))#checksum`.
    HWI's `displayaddress(desc=...)` needs this shape for a multisig address; every
    extended key keeps its origin `[fp/path]`, which Ledger, BitBox02 and Jade need to
    find their own key and register the wallet."""
    parsed = parse_collateral_descriptor(descriptor, network)
    parsed.address(index)  # validates the index (and: fixed-key-only loans have index 0)
    keys = [
        f"{k.key_expression}/0/{index}" if isinstance(k, HDKey) else k.public_key_hex
        for k in parsed.keys
    ]
    return add_checksum(f"wsh(sortedmulti(2,{','.join(keys)}))")


class HwiDevice:
    """One hardware wallet, found by fingerprint, type or path (or the only one present).

    A client is opened per operation and closed after it: devices are unplugged,
    and HWI clients hold the USB handle."""

    def __init__(
        self,
        network: NetworkName,
        *,
        fingerprint: str | None = None,
        device_type: str | None = None,
        device_path: str | None = None,
        password: str | None = None,
    ) -> None:
        self.network: NetworkName = check_network(network)
        self.fingerprint = fingerprint.lower() if fingerprint else None
        self.device_type = device_type
        self.device_path = device_path
        self._password = password

    def __repr__(self) -> str:
        return (
            f"HwiDevice(network={self.network!r}, fingerprint={self.fingerprint!r}, "
            f"device_type={self.device_type!r})"
        )

    @contextmanager
    def _hwi(self, what: str) -> Iterator[None]:
        from hwilib.errors import HWWError

        try:
            yield
        except CustodyError:
            raise
        except (HWWError, OSError, ConnectionError, TimeoutError) as exc:
            raise translate_hwi_error(exc, what) from None

    def list_devices(self) -> list[dict[str, Any]]:
        """HWI's enumerate: type, model, path, fingerprint (when the device gives it)."""
        from hwilib import commands

        with self._hwi("cannot list hardware wallets"):
            devices: list[dict[str, Any]] = commands.enumerate(
                password=self._password, chain=_chain(self.network)
            )
        return devices

    def identify(self) -> str:
        """HWI's type (`ledger`, `trezor`, ...) of the device an operation would use:
        --device-type, else HWI's enumerate entry, else the class of the client HWI opens
        (a locked device may not tell enumerate its fingerprint)."""
        if self.device_type:
            return normalise_device_type(self.device_type)
        found = self.list_devices()
        if self.fingerprint is not None:
            found = [
                d for d in found if str(d.get("fingerprint") or "").lower() == self.fingerprint
            ]
        if len(found) == 1 and isinstance(found[0].get("type"), str) and found[0]["type"]:
            return normalise_device_type(found[0]["type"])
        with self._client("cannot identify the hardware wallet") as client:
            return client_device_type(client)

    @contextmanager
    def _client(self, what: str) -> Iterator[Any]:
        from hwilib import commands

        with self._hwi(what):
            if self.device_type and self.device_path:
                client = commands.get_client(
                    self.device_type,
                    self.device_path,
                    password=self._password,
                    chain=_chain(self.network),
                )
            else:
                if self.fingerprint is None and self.device_type is None:
                    found = commands.enumerate(password=self._password, chain=_chain(self.network))
                    if len(found) > 1:
                        raise DeviceUnavailable(
                            f"{what}: {len(found)} hardware wallets are connected; "
                            "pick one with --fingerprint"
                        )
                client = commands.find_device(
                    password=self._password,
                    device_type=self.device_type,
                    fingerprint=self.fingerprint,
                    chain=_chain(self.network),
                )
            if client is None:
                raise DeviceUnavailable(
                    f"{what}: no hardware wallet found"
                    + (f" with fingerprint {self.fingerprint}" if self.fingerprint else "")
                    + " (plugged in and unlocked?)"
                )
            try:
                yield client
            finally:
                client.close()

    def sign_psbt(self, psbt_b64: str) -> str:
        """Have the device sign; return its PSBT after checking it is the same transaction."""
        from hwilib import commands

        before = _parse(psbt_b64, "the PSBT to sign")
        fixed = ONE_FIXED_KEY if psbt_has_fixed_key(before) else None
        what = "the hardware wallet could not sign"
        with self._client(what) as client, self._hwi(what):
            check_fixed_key(client_device_type(client), fixed, "sign for this loan")
            result = commands.signtx(client, psbt_b64)
        if "error" in result:
            raise DeviceRefused(f"{what}: {result['error']}")
        signed = str(result.get("psbt", ""))
        after = _parse(signed, "the device's PSBT")
        if after.tx.serialize() != before.tx.serialize():
            raise DeviceError("the device returned a PSBT for a different transaction: discarded")
        # Counted, not compared as text: hwilib re-serialises a PSBT (global xpubs in another
        # order), so its `signed` flag and string equality say nothing about signatures.
        if not _signatures(after) - _signatures(before):
            raise DeviceRefused(
                "the device added no signature (is one of its keys in this loan? was it declined?)"
            )
        return signed

    def display_address(self, descriptor: str, index: int) -> str:
        """Show the loan's collateral address at `index` on the device's screen and
        return the address the device computed (compare it; do not trust the host)."""
        from hwilib import commands

        desc = single_branch_descriptor(descriptor, self.network, index)
        fixed = fixed_keys(parse_collateral_descriptor(descriptor, self.network))
        what = "the hardware wallet could not display the address"
        with self._client(what) as client, self._hwi(what):
            check_fixed_key(client_device_type(client), fixed, "show this loan's addresses")
            result = commands.displayaddress(client, desc=desc)
        if "error" in result:
            raise DeviceRefused(f"{what}: {result['error']}")
        return str(result["address"])


def _parse(psbt_b64: str, what: str) -> PSBT:
    try:
        return PSBT.from_string(psbt_b64.strip())
    except Exception as exc:
        raise DeviceRefused(f"{what} cannot be parsed ({type(exc).__name__})") from None


def _signatures(psbt: PSBT) -> set[tuple[int, bytes, bytes]]:
    """(input index, public key, signature) of every partial signature in the PSBT."""
    return {
        (index, key.sec(), bytes(sig))
        for index, inp in enumerate(psbt.inputs)
        for key, sig in inp.partial_sigs.items()
    }
