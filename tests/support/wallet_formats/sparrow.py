"""Sparrow's "Output Descriptor" wallet import, re-implemented from its source:
sparrowwallet/sparrow `io/Descriptor.java` `importWallet` (skip lines starting with
`#`, join the lines of each paragraph, read the first paragraph) and
sparrowwallet/drongo `OutputDescriptor.getOutputDescriptor` with its regexes:

- a trailing `#checksum` (`CHECKSUM_PATTERN`) must be right; `?annotations` are cut;
- the script type comes from the prefix (`wsh(` is P2WSH);
- the threshold is the number after `multi(` (`MULTI_PATTERN`);
- keys are the matches of `XPUB_PATTERN`, each with its `KEY_ORIGIN_PATTERN` origin
  and child path, kept in a map by xpub (a repeated xpub counts once);
- only when NO xpub matched does a plain public key (`PUBKEY_PATTERN`) make an error;
  a plain key next to xpubs is simply not seen. That is how a fixed-key loan's
  descriptor becomes a 2-of-2 of the other two keys.

Addresses are the wallet's: sortedmulti over each xpub's `/0/i` and `/1/i`.
"""

from __future__ import annotations

import re
from typing import Final

from embit.descriptor.checksum import checksum as descriptor_checksum
from support.wallet_formats import FormatError, ParsedKey, ParsedWallet, path_steps

CHECKSUM_CHARSET: Final = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
XPUB_PATTERN: Final = re.compile(r"(\[[^\]]+\])?(.(?:pub|prv)[^/\,)]{100,112})(/[/\d*'hH<>;]+)?")
PUBKEY_PATTERN: Final = re.compile(r"(\[[^\]]+\])?(0[23][0-9a-fA-F]{64})")
MULTI_PATTERN: Final = re.compile(r"multi\(\s*(\d+)", re.IGNORECASE)
LEGACY_MULTI_PATTERN: Final = re.compile(r"(?<!sorted)multi\(\s*\d+", re.IGNORECASE)
KEY_ORIGIN_PATTERN: Final = re.compile(r"\[([A-Fa-f0-9]{8})([/\d'hH]+)?\]")
CHECKSUM_PATTERN: Final = re.compile(f"#([{CHECKSUM_CHARSET}]{{8}})$")


def paragraphs(text: str) -> list[str]:
    """Descriptor.getParagraphs: trimmed lines, `#` lines skipped, blank lines split."""
    out: list[str] = []
    current = ""
    for line in (raw.strip() for raw in text.split("\n")):
        if not line:
            if current:
                out.append(current)
                current = ""
        elif not line.startswith("#"):
            current += line
    if current:
        out.append(current)
    return out


def parse_output_descriptor(descriptor: str) -> ParsedWallet:
    """OutputDescriptor.getOutputDescriptor for a P2WSH multisig descriptor."""
    checksum = CHECKSUM_PATTERN.search(descriptor)
    if checksum is not None:
        body = descriptor[: checksum.start()]
        if descriptor_checksum(body) != checksum.group(1):
            raise FormatError("Descriptor checksum invalid")
        descriptor = body
    descriptor = descriptor.split("?", 1)[0]
    if not descriptor.lower().startswith("wsh("):
        raise FormatError("this re-implementation reads wsh(...) descriptors only")
    if LEGACY_MULTI_PATTERN.search(descriptor):
        raise FormatError("this re-implementation derives sortedmulti only")
    threshold_match = MULTI_PATTERN.search(descriptor)
    keys: dict[str, ParsedKey] = {}
    for match in XPUB_PATTERN.finditer(descriptor):
        fingerprint: str | None = None
        path: tuple[int, ...] | None = None
        if match.group(1):
            origin = KEY_ORIGIN_PATTERN.fullmatch(match.group(1))
            if origin is None:
                raise FormatError(f"bad key origin {match.group(1)}")
            fingerprint = origin.group(1).lower()
            path = path_steps((origin.group(2) or "")[1:]) if origin.group(2) else ()
        keys.setdefault(match.group(2), ParsedKey(match.group(2), fingerprint, path))
    if not keys:
        if PUBKEY_PATTERN.search(descriptor):
            raise FormatError("Descriptors with single public keys are not supported")
        raise FormatError("No extended public keys found in descriptor")
    if threshold_match is None:
        if len(keys) > 1:
            raise FormatError("Cannot determine the multisig threshold")
        threshold = 1
    else:
        threshold = int(threshold_match.group(1))
        if not 1 <= threshold <= len(keys):
            raise FormatError(f"Invalid multisig threshold of {threshold}")
    return ParsedWallet(threshold, tuple(keys.values()))


def import_descriptor_file(text: str) -> ParsedWallet:
    """Descriptor.importWallet: the first paragraph's descriptor."""
    found = paragraphs(text)
    if not found:
        raise FormatError("Could not find an output descriptor in the file")
    return parse_output_descriptor(found[0])
