"""Wallet exports so each party can verify the collateral address on its own
device or software instead of trusting the service's screen.

Formats, and who reads them (`works_with`, repeated in every file):
- `descriptor`: a JSON bundle of BIP-380/389 descriptors (Bitcoin Core, BDK, Trezor
  via HWI, any descriptor wallet);
- `coldcard`: a Coldcard multisig setup file (Coldcard; Sparrow imports it too);
- `bsms`: a BIP-129 descriptor record (Coldcard, Sparrow, Nunchuk);
- `caravan`: a Caravan wallet config (Caravan; Sparrow imports it too);
- `wallet-policy`: a BIP-388 wallet policy (Ledger, BitBox02, Jade);
- `sparrow`: an output-descriptor text file for Sparrow's "Output Descriptor" import.

Where the statement goes: JSON exports carry `works_with` and `note` fields; the
Coldcard and Sparrow files carry `#` comment lines (both importers skip lines that
start with `#`); a BSMS record is exactly four lines with no room for comments, so
its statement travels only in the HTTP headers (`export_notice`), which the route
sends with every export.

A loan whose bank key is a fixed HSM public key can be verified and signed only by
Trezor via HWI, Bitcoin Core and BDK. Coldcard, Caravan and BIP-388 describe a
multisig wallet as xpubs only, and Sparrow's descriptor parser silently drops a
plain public key (it would show a 2-of-2 of the other two keys, with other
addresses), so those four exports refuse such a loan with `ExportUnsupported`
instead of writing a file that a device rejects or, worse, misreads. The
descriptor and BSMS exports stay available and say which wallets to avoid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from custody.errors import ExportUnsupported
from pledge.descriptors import PARTIES, THRESHOLD, CollateralDescriptor, add_checksum
from pledge.keys import HDKey

MAX_WALLET_NAME: Final = 20
# Ledger's Bitcoin app refuses wallet names longer than 16 characters (its doc/wallet.md;
# newer app versions allow 64, older ones 16): the stricter limit serves every version.
MAX_POLICY_NAME: Final = 16
DEFAULT_WALLET_NAME: Final = "pledge-loan"
BSMS_VERSION: Final = "BSMS 1.0"
BSMS_PATH_RESTRICTIONS: Final = "/0/*,/1/*"
POLICY_TEMPLATE: Final = f"wsh(sortedmulti({THRESHOLD},@0/**,@1/**,@2/**))"

_NAME_ALLOWED: Final = re.compile(r"[^A-Za-z0-9 ._-]+")

FIXED_KEY_WORKS_WITH: Final = ("Trezor via HWI", "Bitcoin Core", "BDK")
FIXED_KEY_SIGNERS: Final = "Trezor via HWI, Bitcoin Core or BDK"
FIXED_KEY_ADVICE: Final = (
    f"Verify and sign this loan with {FIXED_KEY_SIGNERS} only, from the descriptor export."
)
FIXED_KEY_WARNING: Final = (
    "This loan's bank key is a fixed HSM public key, not an xpub. "
    f"{FIXED_KEY_ADVICE} Do not use Coldcard, Ledger, BitBox02, Jade, Caravan or "
    "Sparrow for it: they hold multisig keys only as xpubs, and Sparrow silently "
    "reads it as a 2-of-2 of the other two keys, with different addresses."
)

# Who reads each format when every key is an xpub (the statement in each file).
ALL_HD_WORKS_WITH: Final[dict[str, tuple[str, ...]]] = {
    "descriptor": (
        "Bitcoin Core (importdescriptors: receive_descriptor and change_descriptor)",
        "BDK",
        "Trezor via HWI",
        "Sparrow (paste the descriptor)",
        "any BIP-380/389 descriptor wallet",
    ),
    "coldcard": (
        "Coldcard (Settings > Multisig Wallets > Import from File)",
        "Sparrow (File > Import Wallet > Coldcard Multisig)",
    ),
    "bsms": (
        "Coldcard (BSMS import)",
        "Sparrow (File > Import Wallet > BSMS)",
        "Nunchuk (BSMS import)",
    ),
    "caravan": (
        "Caravan (Import wallet configuration)",
        "Sparrow (File > Import Wallet > Caravan Multisig)",
    ),
    "wallet-policy": (
        "Ledger Bitcoin app 2.1+ (register the policy through Sparrow, HWI or Ledger's client)",
        "BitBox02 (firmware 9.15+)",
        "Blockstream Jade (firmware 1.0.24+)",
    ),
    "sparrow": ("Sparrow (File > Import Wallet > Output Descriptor)",),
}

# Why a format cannot hold a fixed key: the first half of its refusal.
_FIXED_KEY_REFUSALS: Final[dict[str, str]] = {
    "coldcard": "a Coldcard multisig file lists every key as an xpub, and Coldcard "
    "registers a multisig wallet only when every key is one",
    "caravan": "a Caravan wallet config lists every key as an xpub",
    "wallet-policy": "a BIP-388 wallet policy (Ledger, BitBox02, Jade) holds only xpubs "
    "in its keys information",
    "sparrow": "Sparrow reads only extended keys from a descriptor: it would silently "
    "drop the fixed key and show a 2-of-2 of the other two keys, with addresses "
    "that are not this loan's",
}

_CARAVAN_NETWORKS: Final[dict[str, str]] = {
    "mainnet": "mainnet",
    "testnet": "testnet",
    "signet": "signet",
    "regtest": "regtest",
}


@dataclass(frozen=True)
class ExportNotice:
    """Which devices and programs can use one export of one loan, and a plain note."""

    works_with: tuple[str, ...]
    note: str

    def headers(self) -> dict[str, str]:
        """The statement as HTTP headers (ASCII), for formats without room for it."""
        return {"X-Works-With": "; ".join(self.works_with), "X-Export-Note": self.note}


def export_notice(cd: CollateralDescriptor, fmt: str) -> ExportNotice:
    """What the export `fmt` of this loan works with; for a fixed-key loan only the
    formats that stay available (descriptor, BSMS) answer, naming Trezor via HWI,
    Bitcoin Core and BDK and warning against the rest."""
    if fmt not in ALL_HD_WORKS_WITH:
        raise ValueError(f"unknown export format {fmt!r}")
    first = f"First receive address: {cd.address(0)}: compare it on your device."
    if cd.has_fixed_key:
        if fmt in _FIXED_KEY_REFUSALS:
            raise _fixed_key_refusal(fmt)
        return ExportNotice(FIXED_KEY_WORKS_WITH, f"{FIXED_KEY_WARNING} {first}")
    return ExportNotice(
        ALL_HD_WORKS_WITH[fmt],
        f"2-of-3 multisig (sortedmulti, native segwit P2WSH) over the miner, bank and "
        f"arbiter keys, every key an xpub with its origin. {first}",
    )


def sanitise_wallet_name(name: str, max_len: int = MAX_WALLET_NAME) -> str:
    """ASCII letters, digits, space, dot, dash, underscore; at most `max_len` chars,
    never starting or ending with a space.

    Coldcard refuses names that are not 1..20 printable ASCII characters, Ledger
    names longer than 16 or with an outer space, and the other formats end up as
    file names, so one conservative rule serves all."""
    cleaned = _NAME_ALLOWED.sub("-", name if isinstance(name, str) else "")
    cleaned = re.sub(r"\s+", " ", cleaned).strip(" .-_")
    cleaned = cleaned[:max_len].strip(" .-_")
    return cleaned or DEFAULT_WALLET_NAME[:max_len]


def _fixed_key_refusal(fmt: str) -> ExportUnsupported:
    return ExportUnsupported(
        f"This export cannot describe this loan: its bank key is a fixed HSM public key, "
        f"and {_FIXED_KEY_REFUSALS[fmt]}. {FIXED_KEY_ADVICE}"
    )


def _require_all_hd(cd: CollateralDescriptor, fmt: str) -> list[HDKey]:
    if cd.has_fixed_key:
        raise _fixed_key_refusal(fmt)
    return cd.hd_keys


def _apostrophe_path(origin_path: str) -> str:
    """`m/48h/1h/0h/2h` -> `m/48'/1'/0'/2'`: the marker BIP-129's and BIP-388's
    examples, Caravan's path check and Ledger's key origins all use."""
    return origin_path.replace("h", "'")


def _apostrophe_key(key: HDKey) -> str:
    """`[fp/48'/1'/0'/2']tpub...` (no derivation suffix)."""
    return f"[{key.fingerprint}{_apostrophe_path(key.origin_path)[1:]}]{key.xpub}"


def export_descriptor(cd: CollateralDescriptor, name: str) -> dict[str, Any]:
    """Descriptors for any descriptor wallet, plus the first address to compare."""
    notice = export_notice(cd, "descriptor")
    return {
        "name": sanitise_wallet_name(name),
        "network": cd.network,
        "descriptor": cd.descriptor,
        "receive_descriptor": cd.receive_descriptor,
        "change_descriptor": cd.change_descriptor,
        "first_address": cd.address(0),
        "keys": [
            {"party": party, "key": key.descriptor_key}
            for party, key in zip(PARTIES, cd.keys, strict=True)
        ],
        "works_with": list(notice.works_with),
        "note": notice.note,
    }


def _comment_lines(notice: ExportNotice) -> list[str]:
    """`#` lines both Coldcard and Sparrow skip. They never name a descriptor function
    such as `sortedmulti(`: Coldcard reads a whole file holding that text as a
    descriptor instead of a setup file."""
    return [f"# Works with: {', '.join(notice.works_with)}.", f"# {notice.note}"]


def export_coldcard(cd: CollateralDescriptor, name: str) -> str:
    """Coldcard multisig setup file (`Name:`, `Policy:`, `Format:`, then per key a
    `Derivation:` line and an `XFP: xpub` line), as Coldcard's firmware parses it.

    Coldcard keys its multisig wallets by master fingerprint and refuses two
    cosigners with the same one ('dup XFP'), so such a loan is refused here."""
    keys = _require_all_hd(cd, "coldcard")
    fingerprints = [key.fingerprint for key in keys]
    for fingerprint in fingerprints:
        if fingerprints.count(fingerprint) > 1:
            raise ExportUnsupported(
                f"Coldcard cannot register this loan: two of its keys share the master "
                f"fingerprint {fingerprint.upper()} (two accounts of one seed), and "
                "Coldcard refuses two cosigners with one fingerprint. Use the BSMS or "
                "descriptor export."
            )
    wallet = sanitise_wallet_name(name)
    lines = [
        f"# Coldcard multisig setup file: pledge custody loan collateral ({cd.network})",
        f"# Keys in order: {', '.join(PARTIES)}.",
        *_comment_lines(export_notice(cd, "coldcard")),
        "#",
        f"Name: {wallet}",
        f"Policy: {THRESHOLD} of {len(keys)}",
        "Format: P2WSH",
    ]
    for key in keys:
        lines += ["", f"Derivation: {key.origin_path}", f"{key.fingerprint.upper()}: {key.xpub}"]
    return "\n".join(lines) + "\n"


def export_bsms(cd: CollateralDescriptor, name: str) -> str:
    """BIP-129 descriptor record (round 2, NO_ENCRYPTION, i.e. the plaintext).

    Line 1 `BSMS 1.0`; line 2 the descriptor template, every xpub with its key
    origin (`[fp/48'/1'/0'/2']tpub.../**`, apostrophes as in the BIP's vectors) so
    each signer can find its own key by path and fingerprint; line 3 the path
    restrictions `/0/*,/1/*`; line 4 the first address. Nothing else: the record
    has no comment lines, so which wallets can read it is said in the HTTP headers.

    Fixed keys: BIP-129 lets a KEY be "a public key or an XPUB" (its first test
    vector is a sortedmulti of plain public keys with "No path restrictions"), and
    the template rule only replaces `/**`, so a fixed key is simply written as its
    hex and stays the same in every expanded descriptor. With all three keys fixed
    the record holds the full descriptor with checksum and "No path restrictions",
    exactly like the BIP's vector. `name` is not part of the format (BIP-129 has no
    name field); it is accepted for a uniform export interface.
    """
    del name
    if not cd.has_wildcard:
        return "\n".join([BSMS_VERSION, cd.descriptor, "No path restrictions", cd.address(0)])
    template_keys = [
        f"{_apostrophe_key(key)}/**" if isinstance(key, HDKey) else key.descriptor_key
        for key in cd.keys
    ]
    template = f"wsh(sortedmulti({THRESHOLD},{','.join(template_keys)}))"
    return "\n".join([BSMS_VERSION, template, BSMS_PATH_RESTRICTIONS, cd.address(0)])


def export_caravan(cd: CollateralDescriptor, name: str) -> dict[str, Any]:
    """Caravan wallet configuration (JSON object).

    Caravan validates BIP-32 paths with `'` as the only hardened marker, so this
    export writes `m/48'/1'/0'/2'`. No `client` block: the party chooses its own
    node or block explorer in Caravan. Only Caravan's own fields: the file is imported
    as is, so which programs take it travels in the answer's headers, not in the file.
    """
    keys = _require_all_hd(cd, "caravan")
    return {
        "name": sanitise_wallet_name(name),
        "addressType": "P2WSH",
        "network": _CARAVAN_NETWORKS[cd.network],
        "quorum": {"requiredSigners": THRESHOLD, "totalSigners": len(keys)},
        "extendedPublicKeys": [
            {
                "name": party,
                "bip32Path": _apostrophe_path(key.origin_path),
                "xpub": key.xpub,
                "xfp": key.fingerprint,
                "method": "text",
            }
            for party, key in zip(PARTIES, keys, strict=True)
        ],
        "startingAddressIndex": 0,
    }


def export_wallet_policy(cd: CollateralDescriptor, name: str) -> dict[str, Any]:
    """BIP-388 wallet policy: `name`, `descriptor_template`, `keys_info`.

    The template is `wsh(sortedmulti(2,@0/**,@1/**,@2/**))`: placeholders in order
    of first appearance, each key once (`/**` is `/<0;1>/*`, the loan's receive and
    change branches); `keys_info` holds `[fp/48'/1'/0'/2']tpub...` in the loan's
    (miner, bank, arbiter) order, pairwise distinct because the loan refuses a key
    used twice. The name follows Ledger's rule (1..16 ASCII, no outer space)."""
    keys = _require_all_hd(cd, "wallet-policy")
    notice = export_notice(cd, "wallet-policy")
    return {
        "name": sanitise_wallet_name(name, MAX_POLICY_NAME),
        "descriptor_template": POLICY_TEMPLATE,
        "keys_info": [_apostrophe_key(key) for key in keys],
        "network": cd.network,
        "first_address": cd.address(0),
        "works_with": list(notice.works_with),
        "note": notice.note,
    }


def export_sparrow(cd: CollateralDescriptor, name: str) -> str:
    """A text file for Sparrow's File > Import Wallet > Output Descriptor.

    Sparrow's importer skips `#` lines and reads the first paragraph as one
    descriptor (the shape Sparrow's own descriptor export writes): here the
    multipath `wsh(sortedmulti(2,[fp/48'/1'/0'/2']tpub.../<0;1>/*,...))#checksum`,
    from which Sparrow derives `/0/i` receive and `/1/i` change addresses. A
    fixed-key loan is refused: Sparrow would drop the fixed key and show a 2-of-2.
    """
    keys = _require_all_hd(cd, "sparrow")
    notice = export_notice(cd, "sparrow")
    body = ",".join(f"{_apostrophe_key(key)}/<0;1>/*" for key in keys)
    descriptor = add_checksum(f"wsh(sortedmulti({THRESHOLD},{body}))")
    lines = [
        f"# Sparrow output descriptor: {sanitise_wallet_name(name)}, pledge custody loan "
        f"collateral ({cd.network}); keys in order: {', '.join(PARTIES)}.",
        *_comment_lines(notice),
        descriptor,
    ]
    return "\n".join(lines) + "\n"
