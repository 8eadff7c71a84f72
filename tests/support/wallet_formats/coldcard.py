"""A Coldcard multisig setup file, read by the rules of Coldcard's firmware
(`shared/multisig.py` `MultisigWallet.from_file`, `from_simple_text`, `check_xpub`;
`shared/utils.py` `cleanup_deriv_path`, `str2xfp`; `shared/desc_utils.py`
`parse_desc_str`), re-stated in Python:

- a file holding the text `sortedmulti(`, or whose non-comment lines hold a
  descriptor function such as `wsh(`, is read as a descriptor, not a setup file;
- a line starting with `#` is a comment; a `#` later in a line starts one unless a
  digit follows it; blank lines and lines without `:` are skipped;
- `label: value`, label case-insensitive: `name`, `policy` (`M of N`, any two
  numbers), `derivation` (applies to the keys after it; `h`, `p` and `'` all mean
  hardened), `format` (`p2sh`, `p2wsh`, `p2sh-p2wsh`, `p2wsh-p2sh`), or an
  8-hex-digit master fingerprint followed by the cosigner's xpub;
- the name is 1..20 printable ASCII characters; 1 <= M <= N <= 15 and N is the
  number of xpubs; no two cosigners share a fingerprint ('dup XFP');
- per xpub: not private, of the device's chain (tpub on test networks), its depth
  equal to the derivation's length, at depth 1 its parent fingerprint equal to the
  XFP; the device's own fingerprint appears exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from embit.bip32 import HDKey as EmbitHDKey
from support.wallet_formats import FormatError, ParsedKey, ParsedWallet, path_steps

MAX_SIGNERS: Final = 15
FORMATS: Final = {
    "p2sh": "P2SH",
    "p2wsh": "P2WSH",
    "p2sh-p2wsh": "P2SH-P2WSH",
    "p2wsh-p2sh": "P2SH-P2WSH",
}
DESCRIPTOR_PREFIXES: Final = (
    "pk(", "pkh(", "wpkh(", "tr(", "addr(", "raw(", "rawtr(", "combo(",
    "sh(", "wsh(", "multi(", "sortedmulti(", "multi_a(", "sortedmulti_a(",
)  # fmt: skip
_DERIVATION: Final = re.compile(r"(m|m/|)[0-9/']*")


@dataclass(frozen=True)
class ColdcardFile:
    name: str
    address_format: str
    wallet: ParsedWallet


def _cleanup_derivation(value: str) -> tuple[int, ...]:
    text = value.strip().lower().replace("p", "'").replace("h", "'")
    if not text.isascii() or _DERIVATION.fullmatch(text) is None:
        raise FormatError(f"bad derivation line: {value!r}")
    return path_steps(text if text.startswith("m") else "m/" + text)


def _is_descriptor(config: str) -> bool:
    if "sortedmulti(" in config:
        return True
    body = "".join(
        line.strip()
        for line in config.split("\n")
        if line.strip() and not line.strip().startswith("#")
    )
    return any(prefix in body for prefix in DESCRIPTOR_PREFIXES)


def _check_xpub(
    xfp: str, xpub: str, derivation: tuple[int, ...] | None, testnet: bool
) -> ParsedKey:
    try:
        node = EmbitHDKey.from_base58(xpub)
    except Exception as exc:
        raise FormatError("unable to parse xpub") from exc
    if node.is_private:
        raise FormatError("no private keys")
    if xpub.startswith("tpub") != testnet:
        raise FormatError("wrong chain")
    if node.depth == 1 and node.fingerprint.hex() != xfp:
        raise FormatError("xfp depth=1 wrong")
    if derivation is None:
        raise FormatError("empty deriv")
    if len(derivation) != node.depth:
        raise FormatError(f"deriv {len(derivation)} != {node.depth} xpub depth")
    return ParsedKey(key=xpub, fingerprint=xfp, path=derivation)


def parse_coldcard(config: str, *, device_xfp: str, testnet: bool) -> ColdcardFile:
    """Read `config` as the Coldcard whose master fingerprint is `device_xfp` would."""
    if _is_descriptor(config):
        raise FormatError("Coldcard would read this file as a descriptor, not a setup file")
    name: str | None = None
    m = n = -1
    derivation: tuple[int, ...] | None = None
    address_format = "P2SH"
    keys: list[ParsedKey] = []
    for raw in config.split("\n"):
        line = raw
        comment = line.find("#")
        if comment == 0:
            continue
        if comment != -1 and not line[comment + 1 : comment + 2].isdigit():
            line = line[:comment]
        line = line.strip()
        if ":" not in line:
            if "pub" in line:
                raise FormatError("a bare xpub without its fingerprint")
            continue
        label, value = line.split(":", 1)
        label, value = label.lower(), value.strip()
        if label == "name":
            name = value
        elif label == "policy":
            match = re.search(r"(\d+)\D*(\d+)", value)
            if match is None:
                raise FormatError("bad policy line")
            m, n = int(match.group(1)), int(match.group(2))
            if not 1 <= m <= n <= MAX_SIGNERS:
                raise FormatError("bad policy line")
        elif label == "derivation":
            if not value:
                raise FormatError("bad derivation line: blank")
            derivation = _cleanup_derivation(value)
        elif label == "format":
            if value.lower() not in FORMATS:
                raise FormatError("bad format line")
            address_format = FORMATS[value.lower()]
        elif len(label) == 8:
            try:
                bytes.fromhex(label)
            except ValueError:
                continue  # the firmware skips a label that is not hex
            keys.append(_check_xpub(label.lower(), value, derivation, testnet))
    if not keys:
        raise FormatError("need xpubs")
    if m == n == -1:
        m = n = len(keys)
    name = name or f"{m}-of-{n}"
    if not (name.isascii() and name.isprintable() and 1 <= len(name) <= 20):
        raise FormatError("name must be ascii, 1..20 long")
    if n != len(keys):
        raise FormatError(f"wrong # of xpubs, expect {n}")
    fingerprints = [k.fingerprint for k in keys]
    if len(set(fingerprints)) != len(fingerprints):
        raise FormatError("dup XFP")
    mine = fingerprints.count(device_xfp.lower())
    if mine != 1:
        raise FormatError("my key not included" if mine == 0 else "my key included more than once")
    return ColdcardFile(name, address_format, ParsedWallet(m, tuple(keys)))
