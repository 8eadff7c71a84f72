"""A Caravan wallet configuration, read by Caravan's config schema (the
`MultisigWalletConfig` of caravan-bitcoin/caravan packages/multisig/src/types.ts, the
fields Caravan's own exports hold) and the checks of @caravan/bitcoin:

- `name`; `addressType` one of `P2SH`, `P2SH-P2WSH`, `P2WSH`; `network` one of
  `mainnet`, `testnet`, `regtest`, `signet`; `quorum.requiredSigners` (and
  `totalSigners`, equal to the number of keys); `extendedPublicKeys`, each with
  `xpub`, `bip32Path`, `xfp`; an optional integer `startingAddressIndex`;
- a path matches `^(m\\/)?(\\d+'?\\/)*\\d+'?$` (`'` is the only hardened marker;
  Caravan also takes `Unknown`, which this reader refuses: the loan's keys all have
  origins), a root fingerprint is 8 hex digits, an xpub is of the config's network;
- addresses are the receive braid `/0/i` and the change braid `/1/i` of a sortedmulti
  (BIP-67) script.
"""

from __future__ import annotations

import re
from typing import Any, Final

from embit.bip32 import HDKey as EmbitHDKey
from support.wallet_formats import FormatError, ParsedKey, ParsedWallet, path_steps

ADDRESS_TYPES: Final = ("P2SH", "P2SH-P2WSH", "P2WSH")
NETWORKS: Final = ("mainnet", "testnet", "regtest", "signet")
BIP32_PATH: Final = re.compile(r"^(m\/)?(\d+'?\/)*\d+'?$")
ROOT_FINGERPRINT: Final = re.compile(r"^[0-9a-fA-F]{8}$")


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{what} must be an integer")
    return value


def parse_caravan(config: dict[str, Any]) -> ParsedWallet:
    """Read a config as Caravan's import would; P2WSH only is derived here."""
    for field in ("name", "addressType", "network", "quorum", "extendedPublicKeys"):
        if field not in config:
            raise FormatError(f"missing {field}")
    if config["addressType"] not in ADDRESS_TYPES:
        raise FormatError(f"unknown addressType {config['addressType']!r}")
    if config["addressType"] != "P2WSH":
        raise FormatError("this reader derives P2WSH wallets only")
    network = config["network"]
    if network not in NETWORKS:
        raise FormatError(f"unknown network {network!r}")
    if "startingAddressIndex" in config and _int(config["startingAddressIndex"], "index") < 0:
        raise FormatError("startingAddressIndex must not be negative")
    entries = config["extendedPublicKeys"]
    if not isinstance(entries, list) or not entries:
        raise FormatError("extendedPublicKeys must be a non-empty list")
    required = _int(config["quorum"].get("requiredSigners"), "requiredSigners")
    total = _int(config["quorum"].get("totalSigners", len(entries)), "totalSigners")
    if total != len(entries) or not 1 <= required <= total:
        raise FormatError("quorum does not match the keys")
    keys: list[ParsedKey] = []
    for entry in entries:
        path, xfp, xpub = entry.get("bip32Path"), entry.get("xfp"), entry.get("xpub")
        if not isinstance(path, str) or BIP32_PATH.match(path) is None:
            raise FormatError(f"BIP32 path is invalid: {path!r}")
        if not isinstance(xfp, str) or ROOT_FINGERPRINT.match(xfp) is None:
            raise FormatError(f"root fingerprint is invalid: {xfp!r}")
        try:
            node = EmbitHDKey.from_base58(xpub)
        except Exception as exc:
            raise FormatError("invalid extended public key") from exc
        if node.is_private or xpub.startswith("xpub") != (network == "mainnet"):
            raise FormatError("extended public key is not for this network")
        keys.append(ParsedKey(key=xpub, fingerprint=xfp.lower(), path=path_steps(path)))
    if len({k.key for k in keys}) != len(keys):
        raise FormatError("duplicate extended public keys")
    return ParsedWallet(required, tuple(keys))
