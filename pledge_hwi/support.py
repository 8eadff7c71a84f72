"""What each kind of hardware wallet can do with a loan's wallet, by HWI device type.

HWI 3.2.0 has no `register` command: Ledger, BitBox02 and Jade register a multisig
wallet (after the person approves it on the device) the first time they are asked to
show one of its addresses, so displaying receive address 0 *is* the registration.
A Coldcard needs its multisig file imported on the device (HWI cannot do it); a Trezor
(and a KeepKey, its fork) checks the wallet each time and keeps nothing.

A loan in fixed-key mode has one key that is a single public key, not an extended key.
Ledger, BitBox02, Jade and Coldcard accept only extended keys (xpubs) in a multisig
wallet, so they can neither register it, show its address nor sign for it; HWI's Trezor
client is the one that passes a bare public key to the device. So every device type but
`trezor` is refused before anything is sent to it: a device error halfway through would
tell the person nothing about why.
"""

from __future__ import annotations

from typing import Final

from embit.psbt import PSBT

from pledge.descriptors import PARTIES, CollateralDescriptor
from pledge.keys import FixedKey
from pledge_hwi.errors import DeviceRefused

__all__ = [
    "FIXED_KEY_DEVICES",
    "IMPORTS_A_FILE",
    "NO_REGISTRATION",
    "ONE_FIXED_KEY",
    "REGISTERS_ON_DISPLAY",
    "FixedKeyUnsupported",
    "check_fixed_key",
    "device_name",
    "fixed_keys",
    "normalise_device_type",
    "psbt_has_fixed_key",
]

REGISTERS_ON_DISPLAY: Final = frozenset({"ledger", "bitbox02", "jade"})
IMPORTS_A_FILE: Final = frozenset({"coldcard"})
NO_REGISTRATION: Final = frozenset({"trezor", "keepkey"})
# KeepKey is left out on purpose: nobody has checked its firmware with a bare key.
FIXED_KEY_DEVICES: Final = frozenset({"trezor"})

_NAMES: Final = {
    "ledger": "Ledger",
    "bitbox02": "BitBox02",
    "jade": "Jade",
    "coldcard": "Coldcard",
    "trezor": "Trezor",
    "keepkey": "KeepKey",
    "digitalbitbox": "Digital Bitbox",
}


class FixedKeyUnsupported(DeviceRefused):
    """The loan has a fixed (non-HD) key and this device accepts only extended keys."""

    code = "fixed_key_unsupported"


def normalise_device_type(text: str) -> str:
    """HWI's device type from a type or model name (`trezor_t` -> `trezor`), as
    `hwilib.commands.get_client` reads it."""
    return text.strip().lower().split("_")[0]


def device_name(device_type: str) -> str:
    return _NAMES.get(device_type, device_type or "this device")


def fixed_keys(descriptor: CollateralDescriptor) -> str | None:
    """Which keys are fixed, as a clause for the refusal, or None if none is."""
    owners = [p for p, k in zip(PARTIES, descriptor.keys, strict=True) if isinstance(k, FixedKey)]
    if not owners:
        return None
    if len(owners) == 1:
        return f"the {owners[0]}'s key is a single public key, not an extended key (xpub)"
    whose = " and ".join(f"the {p}'s" for p in owners)
    return f"{whose} keys are single public keys, not extended keys (xpubs)"


ONE_FIXED_KEY: Final = "one of its keys is a single public key, not an extended key (xpub)"


def check_fixed_key(device_type: str, fixed: str | None, doing: str) -> None:
    """Refuse a fixed-key loan on every device but a Trezor, saying why and what works.
    `fixed` is None (all keys are extended) or says which (`fixed_keys`, `ONE_FIXED_KEY`);
    `doing` completes "it cannot ...", e.g. "show this loan's address"."""
    if fixed is None or device_type in FIXED_KEY_DEVICES:
        return
    raise FixedKeyUnsupported(
        f"this loan is in fixed-key mode: {fixed}, and a {device_name(device_type)} accepts "
        f"only extended keys in a multisig wallet, so it cannot {doing}. Nothing was sent "
        "to the device. Only a Trezor (via HWI), Bitcoin Core or BDK can use such a loan"
    )


def psbt_has_fixed_key(psbt: PSBT) -> bool:
    """True when an input's witness script holds a public key the PSBT gives no BIP-32
    origin for: a fixed key (the service writes an origin for every HD key)."""
    for inp in psbt.inputs:
        if inp.witness_script is None:
            continue
        derived = {key.sec() for key in inp.bip32_derivations}
        if any(key not in derived for key in _pushed_keys(inp.witness_script.data)):
            return True
    return False


def _pushed_keys(script: bytes) -> list[bytes]:
    """The 33-byte pushes of a (CHECKMULTISIG) script: its compressed public keys."""
    keys: list[bytes] = []
    at = 0
    while at < len(script):
        op = script[at]
        if 1 <= op <= 75:
            data = script[at + 1 : at + 1 + op]
            if op == 33:
                keys.append(bytes(data))
            at += 1 + op
        else:
            at += 1
    return keys
