"""A BIP-129 (BSMS) descriptor record, read as its text says a Signer does (round 2,
NO_ENCRYPTION, i.e. the plaintext):

- exactly four lines: the version `BSMS 1.0`; a descriptor or a descriptor template;
  a comma-separated list of derivation path restrictions, each starting with `/` and
  non-hardened, or `No path restrictions` when there is no template; the wallet's
  first address, from the first path restriction when there are restrictions;
- a template is expanded into concrete descriptors by replacing every `/**` with
  each restriction ("Descriptor Template");
- a KEY is a public key or an XPUB with its key origin `[fingerprint/path]`, which
  the Signer uses to find its own KEY; the Signer verifies the first address.

The BIP's own round-2 test vectors are in `BIP129_VECTORS`, copied from
bitcoin/bips bip-0129.mediawiki ("Test Vectors", my_multisig_wallet.bsms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from embit.descriptor.checksum import checksum as descriptor_checksum
from support.wallet_formats import FormatError, ParsedKey, ParsedWallet, addresses, path_steps

from pledge.network import NetworkName

VERSION: Final = "BSMS 1.0"
NO_RESTRICTIONS: Final = "No path restrictions"
_WSH_MULTI: Final = re.compile(r"wsh\(sortedmulti\((\d+),([^()]*)\)\)")
_KEY: Final = re.compile(
    r"(?:\[(?P<fp>[0-9a-fA-F]{8})(?P<path>(?:/\d+['h]?)*)\])?"
    r"(?P<key>[xt]pub[1-9A-HJ-NP-Za-km-z]+|0[23][0-9a-fA-F]{64})(?P<suffix>/\*\*)?"
)
_RESTRICTION: Final = re.compile(r"(/\d+)+/\*")

BIP129_VECTORS: Final = (
    (
        "BSMS 1.0\n"
        "wsh(sortedmulti(1,[59865f44/48'/0'/0'/2']026d15412460ba0d881c21837bb999233896085a9ed4e"
        "5445bd637c10e579768ba,[b7044ca6/48'/0'/0'/2']030baf0497ab406ff50cb48b4013abac8a0338758"
        "d2fd54cd934927afa57cc2062))#rzx9dffd\n"
        "No path restrictions\n"
        "bc1quqy523xu3l8che3s8vja8n33qtg0uyugr9l5z092s3wa50p8t7rqy6zumf"
    ),
    (
        "BSMS 1.0\n"
        "wsh(sortedmulti(2,[1cf0bf7e/48'/0'/0'/2']xpub6FL8FhxNNUVnG64YurPd16AfGyvFLhh7S2uSsDqR3"
        "Qfcm6o9jtcMYwh6DvmcBF9qozxNQmTCVvWtxLpKTnhVLN3Pgnu2D3pAoXYFgVyd8Yz/**,[4fc1dd4a/48'/0'/"
        "0'/2']xpub6EebMbEps7ZcV3FYEnddRsvrFWDrt2tiPmCeM7pPXQEmphvq9ZfJ1LWFUDjf3vxCeBuPrfyGrMazWU"
        "sYsetrnHatQZVLJH7LsgCjtMqdzgj/**))\n"
        "/0/*,/1/*\n"
        "bc1qrgc6p3kylfztu06ysl752gwwuekhvtfh9vr7zg43jvu60mutamcsv948ej"
    ),
)


@dataclass(frozen=True)
class BsmsRecord:
    wallet: ParsedWallet
    restrictions: tuple[str, ...]
    expanded: tuple[str, ...]
    first_address: str


def parse_bsms(record: str, network: NetworkName) -> BsmsRecord:
    """Read and verify a descriptor record (the Signer's checks, short of finding its
    own key, which the caller does with `wallet.keys`)."""
    lines = record.split("\n")
    if len(lines) != 4:
        raise FormatError(f"a descriptor record has 4 lines, this one {len(lines)}")
    version, descriptor, restriction_line, first_address = lines
    if version != VERSION:
        raise FormatError(f"unsupported version {version!r}")
    body, hash_sign, given = descriptor.partition("#")
    if hash_sign and descriptor_checksum(body) != given:
        raise FormatError("descriptor checksum mismatch")
    is_template = "/**" in body
    if restriction_line == NO_RESTRICTIONS:
        if is_template:
            raise FormatError("a descriptor template needs path restrictions")
        restrictions: tuple[str, ...] = ()
        expanded: tuple[str, ...] = (descriptor,)
    else:
        if not is_template:
            raise FormatError("path restrictions without a descriptor template")
        restrictions = tuple(restriction_line.split(","))
        for path in restrictions:
            if _RESTRICTION.fullmatch(path) is None:
                raise FormatError(f"restriction {path!r} must start with / and be non-hardened")
        expanded = tuple(body.replace("/**", path) for path in restrictions)
    match = _WSH_MULTI.fullmatch(body)
    if match is None:
        raise FormatError("not a wsh(sortedmulti(...)) descriptor")
    keys: list[ParsedKey] = []
    for part in match.group(2).split(","):
        key = _KEY.fullmatch(part)
        if key is None:
            raise FormatError(f"not a KEY: {part[:40]!r}")
        is_xpub = key.group("key")[1:4] == "pub"
        if (key.group("suffix") is not None) != (is_template and is_xpub):
            raise FormatError("in a template every xpub, and nothing else, carries /**")
        fp = key.group("fp")
        keys.append(
            ParsedKey(
                key=key.group("key"),
                fingerprint=fp.lower() if fp else None,
                path=path_steps(key.group("path")[1:]) if fp else None,
            )
        )
    wallet = ParsedWallet(int(match.group(1)), tuple(keys))
    if not 1 <= wallet.threshold <= len(keys):
        raise FormatError("threshold out of range")
    derived = addresses(wallet, network, [0])[0]
    if derived != first_address:
        raise FormatError(f"first address {first_address} is not the record's ({derived})")
    return BsmsRecord(wallet, restrictions, expanded, first_address)
