"""A BIP-388 wallet policy (`name`, `descriptor_template`, `keys_info`), read by the
BIP's "Specification" and the Ledger Bitcoin app's registration rules (its
doc/wallet.md "Wallet name"):

- a KEY in the template is a key placeholder `@i` (a non-negative decimal with no
  leading zero) always followed by `/**` or `/<NUM;NUM>/*` with two distinct
  unhardened numbers; no other key may stand in the template;
- placeholders appear for the first time in order (`@0`, then `@1`, ...), none skipped;
  the same placeholder twice needs disjoint `<M;N>` sets (so `@0/**` twice is invalid);
- each key information is an xpub with an optional origin `[fingerprint/NUM'/...]`;
  the public keys are pairwise distinct;
- the descriptor: each placeholder replaced by its key information, every `/**` by
  `/<0;1>/*`;
- Ledger: the name is 1..16 ASCII characters 0x20..0x7e, no space first or last.

`BIP388_MULTISIG_VECTOR` is the BIP's "BIP-48 P2WSH multisig" valid test vector and
`BIP388_INVALID_TEMPLATES` its invalid ones that this reader must refuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from embit.bip32 import HDKey as EmbitHDKey
from support.wallet_formats import FormatError, ParsedKey, ParsedWallet, path_steps

LEDGER_MAX_NAME: Final = 16
_PLACEHOLDER: Final = re.compile(r"@(0|[1-9]\d*)(/\*\*|/<(\d+);(\d+)>/\*)(?=[,)])")
_KEY_INFO: Final = re.compile(
    r"(?:\[(?P<fp>[0-9a-fA-F]{8})(?P<path>(?:/\d+'?)*)\])?(?P<xpub>[1-9A-HJ-NP-Za-km-z]{100,120})"
)
_SORTEDMULTI: Final = re.compile(r"wsh\(sortedmulti\((\d+),([^()]*)\)\)")

BIP388_MULTISIG_VECTOR: Final = {
    "descriptor_template": "wsh(sortedmulti(2,@0/**,@1/**))",
    "keys_info": [
        "[6738736c/48'/0'/0'/2']xpub6FC1fXFP1GXLX5TKtcjHGT4q89SDRehkQLtbKJ2PzWcvbBHtyDsJPLtpLtkG"
        "qYNYZdVVAjRQ5kug9CsapegmmeRutpP7PW4u4wVF9JfkDhw",
        "[b2b1f0cf/48'/0'/0'/2']xpub6EWhjpPa6FqrcaPBuGBZRJVjzGJ1ZsMygRF26RwN932Vfkn1gyCiTbECVitB"
        "jRCkexEvetLdiqzTcYimmzYxyR1BZ79KNevgt61PDcukmC7",
    ],
    "descriptor": "wsh(sortedmulti(2,[6738736c/48'/0'/0'/2']xpub6FC1fXFP1GXLX5TKtcjHGT4q89SDRe"
    "hkQLtbKJ2PzWcvbBHtyDsJPLtpLtkGqYNYZdVVAjRQ5kug9CsapegmmeRutpP7PW4u4wVF9JfkDhw/<0;1>/*,[b2b"
    "1f0cf/48'/0'/0'/2']xpub6EWhjpPa6FqrcaPBuGBZRJVjzGJ1ZsMygRF26RwN932Vfkn1gyCiTbECVitBjRCkexE"
    "vetLdiqzTcYimmzYxyR1BZ79KNevgt61PDcukmC7/<0;1>/*))",
}
BIP388_INVALID_TEMPLATES: Final = (
    "pkh(@0)",
    "pkh(@0/0/**)",
    "sh(multi(1,@1/**,@0/**))",
    "sh(multi(1,@0/**,@2/**))",
    "sh(multi(1,@0/**,@0/**))",
    "sh(multi(1,@0/<0;1>/*,@0/<1;2>/*))",
    "pkh(@0/<0;1;2>/*)",
)


@dataclass(frozen=True)
class WalletPolicy:
    name: str
    descriptor: str
    wallet: ParsedWallet


def check_template(template: str, key_count: int) -> list[tuple[int, frozenset[int]]]:
    """The template's placeholders as (index, branch numbers), or FormatError."""
    found: list[tuple[int, frozenset[int]]] = []
    for at in (m.start() for m in re.finditer("@", template)):
        match = _PLACEHOLDER.match(template, at)
        if match is None:
            raise FormatError(f"key placeholder at {at} has no /** or /<M;N>/* after it")
        if match.group(2) == "/**":
            branches = frozenset({0, 1})
        else:
            first, second = int(match.group(3)), int(match.group(4))
            if first == second or max(first, second) >= 2**31:
                raise FormatError("a multipath needs two distinct unhardened numbers")
            branches = frozenset({first, second})
        found.append((int(match.group(1)), branches))
    if not found:
        raise FormatError("a wallet policy has at least one key placeholder")
    stripped = _PLACEHOLDER.sub("", template)
    if re.search(r"[\[\]]|pub|0[23][0-9a-fA-F]{64}", stripped):
        raise FormatError("a key that is not a placeholder stands in the template")
    seen: list[int] = []
    for position, (index, branches) in enumerate(found):
        if index not in seen:
            if index != len(seen):
                raise FormatError(f"@{index} appears before @{len(seen)}")
            seen.append(index)
        for other, other_branches in found[position + 1 :]:
            if other == index and branches & other_branches:
                raise FormatError(f"@{index} is used twice with overlapping paths")
    if len(seen) != key_count:
        raise FormatError(f"{len(seen)} placeholders for {key_count} keys")
    return found


def _key_info(text: str) -> ParsedKey:
    match = _KEY_INFO.fullmatch(text)
    if match is None:
        raise FormatError(f"not a key information item: {text[:40]!r}")
    try:
        node = EmbitHDKey.from_base58(match.group("xpub"))
    except Exception as exc:
        raise FormatError("the key is not a serialized extended public key") from exc
    if node.is_private:
        raise FormatError("a private key in keys information")
    fp = match.group("fp")
    return ParsedKey(
        key=match.group("xpub"),
        fingerprint=fp.lower() if fp else None,
        path=path_steps(match.group("path")[1:]) if fp else None,
    )


def check_ledger_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= LEDGER_MAX_NAME:
        raise FormatError("Ledger: the name must be 1..16 characters")
    if any(not 0x20 <= ord(ch) <= 0x7E for ch in name) or name[0] == " " or name[-1] == " ":
        raise FormatError("Ledger: ASCII 0x20..0x7e, no space first or last")
    return name


def parse_wallet_policy(policy: dict[str, Any]) -> WalletPolicy:
    """Read a wallet policy as a Ledger registration would."""
    template, keys_info = policy["descriptor_template"], policy["keys_info"]
    if not isinstance(template, str) or not isinstance(keys_info, list):
        raise FormatError("descriptor_template is text and keys_info a list")
    check_template(template, len(keys_info))
    keys = tuple(_key_info(item) for item in keys_info)
    public_keys = [EmbitHDKey.from_base58(k.key).key.sec() for k in keys]
    if len(set(public_keys)) != len(public_keys):
        raise FormatError("the public keys must be pairwise distinct")
    descriptor = re.sub(r"@(\d+)", lambda m: str(keys_info[int(m.group(1))]), template).replace(
        "/**", "/<0;1>/*"
    )
    multi = _SORTEDMULTI.fullmatch(template)
    if multi is None:
        raise FormatError("this reader derives wsh(sortedmulti(...)) policies only")
    placeholders = [p.strip() for p in multi.group(2).split(",")]
    if any(p[p.index("/") :] != "/**" for p in placeholders):
        raise FormatError("this reader derives /** (receive 0, change 1) keys only")
    ordered = tuple(keys[int(p[1 : p.index("/")])] for p in placeholders)
    name = check_ledger_name(policy.get("name"))
    return WalletPolicy(name, descriptor, ParsedWallet(int(multi.group(1)), ordered))
