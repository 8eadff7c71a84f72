"""The loan's collateral descriptor: `wsh(sortedmulti(2,miner,bank,arbiter))`.

Every address the service hands out is computed twice, by bdkpython (Rust
miniscript) and by embit (pure Python), and refused if they differ: an address a
miner deposits to cannot be taken back, so one library bug must not be enough to
lose coins. Checksums come from embit and are verified by bdkpython when it
parses the descriptor, so neither is hand-rolled nor trusted alone.
"""

from __future__ import annotations

import re
from functools import cached_property, lru_cache
from typing import Final

from embit import hashes
from embit.descriptor import Descriptor as EmbitDescriptor
from embit.descriptor.checksum import checksum as embit_checksum

from pledge.bdk_ffi import bdk
from pledge.errors import InvalidInput, LibraryDisagreement
from pledge.keys import (
    MULTIPATH_SUFFIX,
    CollateralKey,
    FixedKey,
    HDKey,
    parse_fixed_key,
    parse_hd_key,
)
from pledge.network import (
    NetworkName,
    bdk_network,
    bdk_network_kind,
    check_network,
    embit_network,
)

THRESHOLD: Final = 2
MAX_INDEX: Final = 2**31
# Parsing a descriptor with both libraries and deriving with both costs milliseconds
# (embit is pure Python), and one signing request rebuilds the same loan's descriptor
# several times. Results depend only on the text, network and index, so successful
# results are memoised process-wide (failures are not: lru_cache does not cache raises).
_PARSE_CACHE_SIZE: Final = 4_096
_DERIVE_CACHE_SIZE: Final = 16_384
PARTIES: Final = ("miner", "bank", "arbiter")
_DESCRIPTOR_RE: Final = re.compile(r"wsh\(sortedmulti\(2,([^()]*)\)\)")


def descriptor_checksum(desc_without_checksum: str) -> str:
    """BIP-380 checksum of a descriptor (computed by embit)."""
    if "#" in desc_without_checksum:
        raise ValueError("descriptor already has a checksum")
    result: str = embit_checksum(desc_without_checksum)
    return result


def has_valid_checksum(text: str) -> bool:
    """True when `text` is `DESCRIPTOR#CHECKSUM` with the right BIP-380 checksum."""
    body, hash_sign, given = text.partition("#")
    if not hash_sign:
        return False
    try:
        return descriptor_checksum(body) == given
    except Exception:
        return False


@lru_cache(maxsize=_PARSE_CACHE_SIZE)
def _canonical_hd_key(key_expression: str, network: NetworkName) -> HDKey:
    """`parse_hd_key` memoised (HDKey is a frozen dataclass, so sharing it is safe)."""
    return parse_hd_key(key_expression, network, field="keys")


@lru_cache(maxsize=_PARSE_CACHE_SIZE)
def _embit_descriptor(text: str) -> EmbitDescriptor:
    """embit's parse, memoised: `derive` returns new objects and never mutates it."""
    try:
        return EmbitDescriptor.from_string(text)
    except Exception as exc:
        raise LibraryDisagreement(
            f"embit refused a descriptor this service built ({type(exc).__name__})"
        ) from None


@lru_cache(maxsize=_DERIVE_CACHE_SIZE)
def _derived(descriptor: str, index: int, change: bool) -> EmbitDescriptor:
    """The embit descriptor derived at one index (memoised, never mutated by callers)."""
    return _embit_descriptor(descriptor).derive(index, branch_index=1 if change else 0)


@lru_cache(maxsize=_PARSE_CACHE_SIZE)
def add_checksum(desc_without_checksum: str) -> str:
    return f"{desc_without_checksum}#{descriptor_checksum(desc_without_checksum)}"


def _bdk_descriptor(text: str, network: NetworkName) -> bdk.Descriptor:
    """Parse with bdkpython; it verifies the checksum we computed with embit."""
    return _bdk_parse(bdk.Descriptor, text, network)


@lru_cache(maxsize=_PARSE_CACHE_SIZE)
def _bdk_parse(parser: type[bdk.Descriptor], text: str, network: NetworkName) -> bdk.Descriptor:
    """Memoised per parser (so a replaced `bdk.Descriptor` is really called): a bdk
    Descriptor is immutable, so sharing one is safe."""
    try:
        return parser(text, bdk_network_kind(network))
    except Exception as exc:
        raise LibraryDisagreement(
            f"bdkpython refused a descriptor this service built ({type(exc).__name__})"
        ) from None


def _check_index(index: object) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise InvalidInput("the address index must be an integer", field="index")
    if not 0 <= index < MAX_INDEX:
        raise InvalidInput(
            f"the address index must be between 0 and {MAX_INDEX - 1}", field="index"
        )
    return index


class CollateralDescriptor:
    """The 2-of-3 sortedmulti P2WSH descriptor of one loan.

    Keys are given in (miner, bank, arbiter) order and kept in that order in the
    descriptor text; sortedmulti sorts the derived keys in the script, so the
    order only matters for humans reading the descriptor.
    """

    def __init__(
        self,
        keys: tuple[CollateralKey, CollateralKey, CollateralKey],
        network: NetworkName,
    ) -> None:
        self.network: NetworkName = check_network(network)
        if len(keys) != len(PARTIES):
            raise InvalidInput("a collateral descriptor needs exactly three keys", field="keys")
        seen: dict[str, str] = {}
        for party, key in zip(PARTIES, keys, strict=True):
            if not isinstance(key, HDKey | FixedKey):
                raise InvalidInput(f"the {party} key is not a parsed key", field="keys")
            if isinstance(key, HDKey):
                # Re-parse: proves the key belongs to this network and is canonical.
                again = _canonical_hd_key(key.key_expression, self.network)
                if again != key:
                    raise InvalidInput(
                        f"the {party} key is not in canonical form for {self.network}",
                        field="keys",
                    )
            if key.identity in seen:
                raise InvalidInput(
                    f"the {seen[key.identity]} and {party} keys are the same key: "
                    "each party needs its own key",
                    field="keys",
                )
            seen[key.identity] = party
        self.keys: tuple[CollateralKey, CollateralKey, CollateralKey] = keys
        # Parse everything once now, so a descriptor both libraries cannot read
        # fails at construction rather than when an address is first needed.
        self._embit = _embit_descriptor(self.descriptor)
        self._bdk_branches = (
            _bdk_descriptor(self.receive_descriptor, self.network),
            _bdk_descriptor(self.change_descriptor, self.network),
        )
        _bdk_descriptor(self.descriptor, self.network)

    def __repr__(self) -> str:
        return f"CollateralDescriptor({self.descriptor!r}, network={self.network!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CollateralDescriptor):
            return NotImplemented
        return self.descriptor == other.descriptor and self.network == other.network

    def __hash__(self) -> int:
        return hash((self.descriptor, self.network))

    # -- text forms -------------------------------------------------------

    def _body(self, keys: list[str]) -> str:
        return f"wsh(sortedmulti({THRESHOLD},{','.join(keys)}))"

    @cached_property
    def descriptor_without_checksum(self) -> str:
        return self._body([k.descriptor_key for k in self.keys])

    @cached_property
    def descriptor(self) -> str:
        """The multipath (BIP-389 `<0;1>`) descriptor with checksum."""
        return add_checksum(self.descriptor_without_checksum)

    def branch_descriptor(self, change: bool) -> str:
        return add_checksum(self._body([k.branch_key(int(change)) for k in self.keys]))

    @cached_property
    def receive_descriptor(self) -> str:
        return self.branch_descriptor(False)

    @cached_property
    def change_descriptor(self) -> str:
        return self.branch_descriptor(True)

    @property
    def has_wildcard(self) -> bool:
        """False only when all three keys are fixed: then index 0 is the only address."""
        return any(isinstance(k, HDKey) for k in self.keys)

    @property
    def has_fixed_key(self) -> bool:
        return any(isinstance(k, FixedKey) for k in self.keys)

    @property
    def hd_keys(self) -> list[HDKey]:
        return [k for k in self.keys if isinstance(k, HDKey)]

    @property
    def key_set_identity(self) -> frozenset[str]:
        """The set of key identities, to enforce "no two loans share a key set"."""
        return frozenset(k.identity for k in self.keys)

    # -- derivation -------------------------------------------------------

    def _index(self, index: object) -> int:
        idx = _check_index(index)
        if not self.has_wildcard and idx != 0:
            raise InvalidInput(
                "this loan's keys are all fixed keys, so it has exactly one address (index 0)",
                field="index",
            )
        return idx

    def _embit_derived(self, index: int, change: bool) -> EmbitDescriptor:
        return _derived(self.descriptor, index, change)

    def address(self, index: int, change: bool = False) -> str:
        """The collateral address at `index`, agreed by bdkpython and embit."""
        idx = self._index(index)
        return _agreed_output(self, self._bdk_branches[int(change)], idx, change)[0]

    def script_pubkey(self, index: int, change: bool = False) -> bytes:
        """The output script at `index`, agreed by both libraries."""
        idx = self._index(index)
        return _agreed_output(self, self._bdk_branches[int(change)], idx, change)[1]

    def _output(self, idx: int, change: bool) -> tuple[str, bytes]:
        """Address and script from one derivation in each library, compared (a bdk
        derivation costs about 3 ms, so address and script share one)."""
        derived = self._embit_derived(idx, change)
        from_embit = (
            str(derived.address(embit_network(self.network))),
            bytes(derived.script_pubkey().data),
        )
        bdk_address = self._bdk_branches[int(change)].derive_address(idx, bdk_network(self.network))
        from_bdk = (str(bdk_address), bytes(bdk_address.script_pubkey().to_bytes()))
        if from_bdk[0] != from_embit[0]:
            raise LibraryDisagreement(
                f"bdkpython and embit derive different addresses for index {idx} "
                f"(change={change}): refusing to hand out either"
            )
        if from_bdk[1] != from_embit[1]:
            raise LibraryDisagreement(
                f"bdkpython and embit derive different scripts for index {idx}"
            )
        return from_bdk

    def witness_script(self, index: int, change: bool = False) -> bytes:
        """The 2-of-3 CHECKMULTISIG witness script, checked against the script pubkey."""
        idx = self._index(index)
        return _checked_witness_script(self, self._bdk_branches[int(change)], idx, change)

    def _witness_script(self, idx: int, change: bool) -> bytes:
        script: bytes = self._embit_derived(idx, change).witness_script().data
        if b"\x00\x20" + hashes.sha256(script) != self.script_pubkey(idx, change):
            raise LibraryDisagreement(
                f"the witness script for index {idx} does not hash to the agreed output script"
            )
        return script


# Keyed by the descriptor (hash/eq: its text and network) and the bdk branch object it
# holds (identity: instances share the memoised parse), so two instances of one loan's
# descriptor share results, while an instance holding other library objects is checked
# afresh. The values are immutable (str/bytes).
@lru_cache(maxsize=_DERIVE_CACHE_SIZE)
def _agreed_output(
    descriptor: CollateralDescriptor, bdk_branch: bdk.Descriptor, index: int, change: bool
) -> tuple[str, bytes]:
    return descriptor._output(index, change)


@lru_cache(maxsize=_DERIVE_CACHE_SIZE)
def _checked_witness_script(
    descriptor: CollateralDescriptor, bdk_branch: bdk.Descriptor, index: int, change: bool
) -> bytes:
    return descriptor._witness_script(index, change)


def parse_collateral_descriptor(text: str, network: NetworkName) -> CollateralDescriptor:
    """Parse a descriptor produced by `CollateralDescriptor.descriptor` (round trip).

    Only the exact shape this service issues is accepted; a checksum, when
    present, must be right."""
    network = check_network(network)
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("the descriptor is empty", field="descriptor")
    return _parse_collateral_descriptor(text, network)


@lru_cache(maxsize=_PARSE_CACHE_SIZE)
def _parse_collateral_descriptor(text: str, network: NetworkName) -> CollateralDescriptor:
    """Memoised: a loan's stored descriptor is parsed several times per signing request
    (checksum, three keys, both libraries); the result depends on the text and network
    alone and is never mutated (refusals raise, and lru_cache keeps no raise)."""
    field = "descriptor"
    text = text.strip()
    if len(text) > 2000 or not text.isascii():
        raise InvalidInput("the descriptor is too long or not ASCII", field=field)
    body, hash_sign, _ = text.partition("#")
    if hash_sign and not has_valid_checksum(text):
        raise InvalidInput(
            "the descriptor checksum does not match: a character is mistyped or missing",
            field=field,
        )
    match = _DESCRIPTOR_RE.fullmatch(body)
    if match is None:
        raise InvalidInput(
            "expected a 2-of-3 collateral descriptor: wsh(sortedmulti(2,KEY,KEY,KEY))",
            field=field,
        )
    parts = match.group(1).split(",")
    if len(parts) != len(PARTIES):
        raise InvalidInput("the descriptor must hold exactly three keys", field=field)
    keys: list[CollateralKey] = []
    for part in parts:
        if part.startswith("["):
            if not part.endswith(MULTIPATH_SUFFIX):
                raise InvalidInput(
                    f"HD keys in a collateral descriptor end with {MULTIPATH_SUFFIX}",
                    field=field,
                )
            keys.append(parse_hd_key(part, network, field=field))
        else:
            keys.append(parse_fixed_key(part, field=field))
    return CollateralDescriptor((keys[0], keys[1], keys[2]), network)
