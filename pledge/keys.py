"""Parsing and checking the public keys a party registers for a loan.

A key arrives as text typed or pasted by a person, so every way it can be wrong
gets its own plain message: the operator must learn *what* to fix ("this is a
mainnet xpub, the service runs on regtest"), never see a library traceback.

Two kinds of key exist (see DESIGN.md):
- `HDKey`: a BIP-48 P2WSH account xpub with its origin, used as `.../<0;1>/*`;
- `FixedKey`: one compressed secp256k1 public key (the bank's HSM key for a loan).

Canonical forms: origins are written with the `h` hardened marker
(`m/48h/1h/0h/2h`), xpubs are re-encoded with the network's standard version bytes
(xpub on mainnet, tpub on test networks) whatever SLIP-132 prefix came in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from embit import base58
from embit.bip32 import HARDENED_INDEX
from embit.bip32 import HDKey as EmbitHDKey
from embit.ec import PublicKey
from embit.networks import NETWORKS

from pledge.errors import InvalidInput
from pledge.network import NetworkName, check_network, coin_type, embit_network

MAX_KEY_TEXT: Final = 200
MULTIPATH_SUFFIX: Final = "/<0;1>/*"
BIP48_P2WSH_SCRIPT_TYPE: Final = 2

_EXTENDED_KEY_BYTES: Final = 78
_FINGERPRINT_RE: Final = re.compile(r"[0-9a-fA-F]{8}")
_PATH_STEP_RE: Final = re.compile(r"(0|[1-9][0-9]{0,9})([hH']?)")
_HEX_RE: Final = re.compile(r"[0-9a-fA-F]*")


def _version_table() -> dict[bytes, tuple[bool, bool, str]]:
    """Map every SLIP-132 version embit knows to (is_mainnet, is_private, prefix)."""
    table: dict[bytes, tuple[bool, bool, str]] = {}
    for net_key, params in NETWORKS.items():
        for name, value in params.items():
            if isinstance(value, bytes) and len(value) == 4 and name[1:] in ("pub", "prv"):
                table[value] = (net_key == "main", name.endswith("prv"), name)
    return table


_VERSIONS: Final = _version_table()


def format_path(path: list[int]) -> str:
    """`[2147483696, 2147483649, ...]` -> `m/48h/1h/...` (our one canonical form)."""
    steps = [f"{step - HARDENED_INDEX}h" if step >= HARDENED_INDEX else str(step) for step in path]
    return "/".join(["m", *steps])


@lru_cache(maxsize=8192)
def _parsed_xpub(xpub: str) -> EmbitHDKey:
    """Base58-decoding an xpub costs more than deriving from it; keys are immutable."""
    return EmbitHDKey.from_base58(xpub)


@lru_cache(maxsize=65536)
def _child_sec(xpub: str, change: int, index: int) -> bytes:
    """The child public key at `change/index` of `xpub`, memoised: a function of its
    arguments alone, and a signing request derives the same few children of each seat's
    key up to ten times (building, checking, the bank's signer, the upload); embit builds
    two HD keys per derivation, each base58-encoded once to check its version."""
    child = _parsed_xpub(xpub).derive([change, index])
    sec: bytes = child.key.sec()
    return sec


@dataclass(frozen=True)
class HDKey:
    """A BIP-48 account xpub with its origin; derives `<0;1>/*` children."""

    fingerprint: str
    origin_path: str
    xpub: str

    @property
    def path(self) -> list[int]:
        """The origin path as integers (hardened steps have bit 31 set)."""
        out: list[int] = []
        for step in self.origin_path.split("/")[1:]:
            out.append(int(step[:-1]) + HARDENED_INDEX if step.endswith("h") else int(step))
        return out

    @property
    def origin(self) -> str:
        """`fp/48h/1h/0h/2h`, the inside of the descriptor's origin brackets."""
        return self.fingerprint + self.origin_path[1:]

    @property
    def key_expression(self) -> str:
        """`[fp/48h/1h/0h/2h]tpub...` without any derivation suffix."""
        return f"[{self.origin}]{self.xpub}"

    @property
    def descriptor_key(self) -> str:
        return self.key_expression + MULTIPATH_SUFFIX

    def branch_key(self, change: int) -> str:
        """The single-path key expression for one branch (0 receive, 1 change)."""
        return f"{self.key_expression}/{change}/*"

    @property
    def identity(self) -> str:
        """The key material (chain code + public key), independent of how it was
        encoded (tpub/Vpub) or which origin was claimed for it."""
        material: bytes = self._embit().serialize()[13:]
        return "hd:" + material.hex()

    def _embit(self) -> EmbitHDKey:
        return _parsed_xpub(self.xpub)

    def public_key(self, change: int, index: int) -> bytes:
        """Compressed public key at `<origin>/change/index`."""
        _check_child(change, index)
        return _child_sec(self.xpub, change, index)

    def derivation(self, change: int, index: int) -> tuple[bytes, list[int]]:
        """(master fingerprint, full path from the master): what PSBT BIP-32
        derivation fields carry so hardware wallets recognise their key."""
        _check_child(change, index)
        return bytes.fromhex(self.fingerprint), [*self.path, change, index]


@dataclass(frozen=True)
class FixedKey:
    """One compressed public key used as is (an HSM key, one per loan)."""

    public_key_hex: str

    @property
    def descriptor_key(self) -> str:
        return self.public_key_hex

    def branch_key(self, change: int) -> str:
        return self.public_key_hex

    @property
    def identity(self) -> str:
        return "pk:" + self.public_key_hex

    @property
    def public_key(self) -> bytes:
        return bytes.fromhex(self.public_key_hex)


CollateralKey = HDKey | FixedKey


def _check_child(change: int, index: int) -> None:
    if change not in (0, 1):
        raise ValueError(f"change must be 0 or 1, got {change!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < HARDENED_INDEX:
        raise ValueError(f"index must be an integer in [0, 2**31), got {index!r}")


def _check_text(text: object, *, field: str, what: str) -> str:
    """Generic hygiene shared by every key: a string, ASCII, not empty, no inner spaces."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be text", field=field)
    text = text.strip()
    if not text:
        raise InvalidInput(f"{what} is empty", field=field)
    if len(text) > MAX_KEY_TEXT:
        raise InvalidInput(
            f"{what} is too long ({len(text)} characters, at most {MAX_KEY_TEXT})", field=field
        )
    if not text.isascii():
        raise InvalidInput(f"{what} contains non-ASCII characters", field=field)
    if any(ch.isspace() for ch in text) or not text.isprintable():
        raise InvalidInput(
            f"{what} contains spaces or control characters: paste it as one piece", field=field
        )
    return text


def _parse_origin_path(text: str, *, field: str) -> list[int]:
    steps = text.split("/")
    out: list[int] = []
    for step in steps:
        match = _PATH_STEP_RE.fullmatch(step)
        if match is None:
            raise InvalidInput(
                f"key origin path step {step!r} is not a number with an optional h or '",
                field=field,
            )
        number = int(match.group(1))
        if number >= HARDENED_INDEX:
            raise InvalidInput(f"key origin path step {step!r} is out of range", field=field)
        out.append(number + HARDENED_INDEX if match.group(2) else number)
    return out


def _network_label(is_mainnet: bool) -> str:
    return "mainnet" if is_mainnet else "test-network (testnet/signet/regtest)"


def parse_hd_key(text: str, network: NetworkName, *, field: str) -> HDKey:
    """Parse `[fingerprint/48h/<coin>h/<account>h/2h]xpub` (optionally followed by
    `/<0;1>/*` or `/**`) into a canonical HDKey for `network`, or raise InvalidInput."""
    return _parse_hd_key(
        _check_text(text, field=field, what="the key"), check_network(network), field
    )


# Every address hand-out and signing request rebuilds its loan's descriptor from the
# stored keys: the base58 check and key checks cost a third of a millisecond per key.
# The result is immutable; failures raise and are not cached.
@lru_cache(maxsize=4_096)
def _parse_hd_key(text: str, network: NetworkName, field: str) -> HDKey:
    coin = coin_type(network)
    expected = f"[fingerprint/48h/{coin}h/<account>h/2h]{'xpub' if coin == 0 else 'tpub'}..."

    if not text.startswith("["):
        body = text
        if body[1:4] == "prv":
            raise InvalidInput(
                "private keys are never accepted: export the account xpub instead", field=field
            )
        raise InvalidInput(
            f"missing key origin: expected {expected} (the master fingerprint and the "
            "derivation path the device shows with the xpub)",
            field=field,
        )
    close = text.find("]")
    if close < 0:
        raise InvalidInput("key origin is not closed: missing ']'", field=field)
    origin, body = text[1:close], text[close + 1 :]
    fingerprint_text, _, path_text = origin.partition("/")
    if body[1:4] == "prv":
        raise InvalidInput(
            "private keys are never accepted: export the account xpub instead", field=field
        )
    if _FINGERPRINT_RE.fullmatch(fingerprint_text) is None:
        raise InvalidInput(
            f"key origin must start with the 8-hex-digit master fingerprint, got "
            f"{fingerprint_text[:16]!r}",
            field=field,
        )
    if not path_text:
        raise InvalidInput(f"key origin has no derivation path: expected {expected}", field=field)
    path = _parse_origin_path(path_text, field=field)

    xpub_text, slash, suffix = body.partition("/")
    if slash and "/" + suffix not in (MULTIPATH_SUFFIX, "/**"):
        raise InvalidInput(
            f"unexpected derivation after the xpub ({'/' + suffix[:20]!r}): only "
            f"{MULTIPATH_SUFFIX!r} or '/**' may follow it",
            field=field,
        )
    if not xpub_text:
        raise InvalidInput("the xpub after the key origin is missing", field=field)
    try:
        raw = base58.decode_check(xpub_text)
    except ValueError as exc:
        if "Checksum" in str(exc):
            raise InvalidInput(
                "the xpub's checksum does not match: a character is mistyped or missing",
                field=field,
            ) from None
        raise InvalidInput(
            "the xpub contains characters that are not valid base58", field=field
        ) from None
    if len(raw) != _EXTENDED_KEY_BYTES:
        raise InvalidInput(
            "this is not an extended public key (wrong length after decoding)", field=field
        )
    version = _VERSIONS.get(raw[:4])
    if version is None:
        raise InvalidInput(
            "unknown extended key version: expected xpub/ypub/zpub/Ypub/Zpub (mainnet) or "
            "tpub/upub/vpub/Upub/Vpub (test networks)",
            field=field,
        )
    key_is_mainnet, is_private, _ = version
    prefix = xpub_text[:4]
    if is_private:
        raise InvalidInput(
            "private keys are never accepted: export the account xpub instead", field=field
        )
    if key_is_mainnet != (network == "mainnet"):
        raise InvalidInput(
            f"wrong network: this is a {_network_label(key_is_mainnet)} {prefix}, "
            f"the service runs on {network}",
            field=field,
        )
    try:
        parsed = EmbitHDKey.parse(raw)
    except Exception:
        raise InvalidInput("the xpub does not hold a valid public key", field=field) from None

    fingerprint = fingerprint_text.lower()
    if parsed.depth != len(path):
        raise InvalidInput(
            f"the key origin has {len(path)} derivation steps but the xpub is at depth "
            f"{parsed.depth}: origin and xpub do not belong together",
            field=field,
        )
    if parsed.depth == 1 and parsed.fingerprint.hex() != fingerprint:
        raise InvalidInput(
            f"the xpub's parent fingerprint {parsed.fingerprint.hex()} does not match the "
            f"origin fingerprint {fingerprint}",
            field=field,
        )
    h = HARDENED_INDEX
    if (
        len(path) != 4
        or path[0] != 48 + h
        or path[1] != coin + h
        or path[2] < h
        or path[3] != BIP48_P2WSH_SCRIPT_TYPE + h
    ):
        raise InvalidInput(
            f"derivation path {format_path(path)} is not a BIP-48 native-segwit multisig "
            f"account on {network}: expected m/48h/{coin}h/<account>h/2h",
            field=field,
        )
    if parsed.child_number != path[-1]:
        raise InvalidInput(
            "the xpub's child number does not match the last step of the key origin",
            field=field,
        )
    xpub = parsed.to_base58(version=embit_network(network)["xpub"])
    return HDKey(fingerprint=fingerprint, origin_path=format_path(path), xpub=xpub)


def parse_fixed_key(text: str, *, field: str) -> FixedKey:
    """Parse a 33-byte compressed public key in hex, or raise InvalidInput."""
    text = _check_text(text, field=field, what="the public key")
    if _HEX_RE.fullmatch(text) is None:
        raise InvalidInput("the public key must be hexadecimal (0-9, a-f)", field=field)
    text = text.lower()
    if len(text) == 130 and text.startswith("04"):
        raise InvalidInput(
            "uncompressed public keys are not accepted (segwit needs the 33-byte "
            "compressed form starting with 02 or 03)",
            field=field,
        )
    if len(text) != 66:
        raise InvalidInput(
            f"the public key must be 66 hex characters (33 bytes), got {len(text)}", field=field
        )
    if text[:2] not in ("02", "03"):
        raise InvalidInput("a compressed public key starts with 02 or 03", field=field)
    try:
        PublicKey.parse(bytes.fromhex(text))
    except Exception:
        raise InvalidInput(
            "this is not a valid secp256k1 public key (not a point on the curve)", field=field
        ) from None
    return FixedKey(public_key_hex=text)


def account_path(network: NetworkName, account: int = 0) -> str:
    """The BIP-48 P2WSH account path, `m/48h/<coin>h/<account>h/2h`."""
    return f"m/48h/{coin_type(network)}h/{account}h/2h"
