"""Proof of collateral: the document's format and every check on it that needs no node.

Pure (no I/O, nothing of the service): the builder (`custody/proof/`) and the verifier
(`custody proof verify`, or anyone's own code following README's "Checking a proof of
collateral without this project") share these definitions, and the verifier asks a node
only what `ChainView` names. A document (format `pledge-proof-of-collateral`, version 1)
holds, at a block height H:

- `headers`: every 80-byte header from the earliest block a collateral outpoint confirmed
  in up to H; each links to the one before and meets its own proof-of-work target.
- per loan: its descriptor (so anyone derives the scripts), each collateral outpoint with
  its amount, the address index it pays, the raw transaction (its txid is hashed here, the
  output read from it) and a Merkle proof of the transaction in its block, serialized as
  Bitcoin Core's `gettxoutproof` does (a `CMerkleBlock`: Core's `verifytxoutproof` reads it).
- a Merkle-sum tree over the loans: leaf = tagged hash of (loan id, descriptor checksum,
  amount, salt), node = tagged hash of (left hash, left sum, right hash, right sum) with
  the sum of both; each loan's path to the root, the root and the total.

Both child sums are in a node's hash (not only their total), so a prover cannot show two
miners paths that split one node's sum differently. A lone last node is carried up a
level unchanged (never paired with itself, which would count its sum twice).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from embit.transaction import Transaction

from pledge.descriptors import parse_collateral_descriptor
from pledge.errors import CustodyError
from pledge.network import check_network

FORMAT: Final = "pledge-proof-of-collateral"
VERSION: Final = 1
HEADER_SIZE: Final = 80
MAX_SATS: Final = 21_000_000 * 100_000_000
# Core's bound on a CMerkleBlock's transaction count (MAX_BLOCK_WEIGHT / MIN_TX_WEIGHT).
MAX_BLOCK_TXS: Final = 4_000_000 // 240
LEAF_TAG: Final = b"pledge/proof/leaf"
NODE_TAG: Final = b"pledge/proof/node"
EMPTY_TAG: Final = b"pledge/proof/empty"
SALT_TAG: Final = b"pledge/proof/salt"


class ProofInvalid(CustodyError):
    """A proof of collateral's document is malformed or one of its checks failed."""

    status_code = 422
    code = "proof_invalid"


def sha256d(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def tagged_hash(tag: bytes, message: bytes) -> bytes:
    """BIP-340's tagged hash, so a leaf can never be read as a node or anything else."""
    tag_hash = hashlib.sha256(tag).digest()
    return hashlib.sha256(tag_hash + tag_hash + message).digest()


# -- block headers ----------------------------------------------------------------------


@dataclass(frozen=True)
class BlockHeader:
    raw: bytes

    @property
    def hash(self) -> str:
        """The block hash as nodes display it (byte-reversed)."""
        return sha256d(self.raw)[::-1].hex()

    @property
    def prev_hash(self) -> str:
        return self.raw[4:36][::-1].hex()

    @property
    def merkle_root(self) -> bytes:
        """In internal byte order (as hashed), not display order."""
        return self.raw[36:68]

    @property
    def bits(self) -> int:
        return int.from_bytes(self.raw[72:76], "little")


def parse_header(hex_text: object) -> BlockHeader:
    if not isinstance(hex_text, str):
        raise ProofInvalid("a block header is not hex text", field="headers")
    try:
        raw = bytes.fromhex(hex_text)
    except ValueError:
        raise ProofInvalid("a block header is not hex", field="headers") from None
    if len(raw) != HEADER_SIZE:
        raise ProofInvalid(f"a block header is {len(raw)} bytes, not 80", field="headers")
    return BlockHeader(raw)


def target_from_bits(bits: int) -> int:
    """The proof-of-work target a header's compact `bits` encode (refusing negative or
    overflowing encodings as Core's `CheckProofOfWork` does)."""
    exponent, mantissa = bits >> 24, bits & 0x007FFFFF
    if bits & 0x00800000 or mantissa == 0:
        raise ProofInvalid("a header's difficulty bits are negative or zero", field="headers")
    target = mantissa >> 8 * (3 - exponent) if exponent <= 3 else mantissa << 8 * (exponent - 3)
    if target >= 1 << 256:
        raise ProofInvalid("a header's difficulty bits overflow", field="headers")
    return target


def check_header_chain(headers: Sequence[BlockHeader]) -> None:
    """Each header meets its own target and names the one before it as its parent.

    Whether the target is the right one for the network at that height (difficulty
    retargeting) is not checked here: the verifier compares every hash with the node's."""
    for i, header in enumerate(headers):
        if int.from_bytes(sha256d(header.raw)[::-1], "big") > target_from_bits(header.bits):
            raise ProofInvalid(
                f"header {i} does not meet its proof-of-work target", field="headers"
            )
        if i and header.prev_hash != headers[i - 1].hash:
            raise ProofInvalid(f"header {i} does not link to the header before it", field="headers")


# -- Merkle proofs of transactions: Core's CPartialMerkleTree / CMerkleBlock ------------


def _width(count: int, height: int) -> int:
    return (count + (1 << height) - 1) >> height


def _tree_height(count: int) -> int:
    height = 0
    while _width(count, height) > 1:
        height += 1
    return height


def _calc_hash(height: int, pos: int, txids: Sequence[bytes]) -> bytes:
    if height == 0:
        return txids[pos]
    left = _calc_hash(height - 1, pos * 2, txids)
    right = (
        _calc_hash(height - 1, pos * 2 + 1, txids)
        if pos * 2 + 1 < _width(len(txids), height - 1)
        else left
    )
    return sha256d(left + right)


def merkle_root(txids: Sequence[str]) -> bytes:
    """The block's Merkle root (internal order) of txids given in display order."""
    if not txids:
        raise ValueError("a block has at least one transaction")
    hashes = [bytes.fromhex(t)[::-1] for t in txids]
    return _calc_hash(_tree_height(len(hashes)), 0, hashes)


def _compact_size(n: int) -> bytes:
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + n.to_bytes(2, "little")
    return b"\xfe" + n.to_bytes(4, "little")


def build_merkle_block(header: bytes, txids: Sequence[str], matched: Iterable[str]) -> bytes:
    """The `CMerkleBlock` (header, transaction count, hashes, flag bits) proving `matched`
    are in the block whose transactions are `txids` (display order), byte for byte what
    Core's `gettxoutproof` answers (hex of it)."""
    wanted = set(matched)
    hashes = [bytes.fromhex(t)[::-1] for t in txids]
    match = [t in wanted for t in txids]
    if not wanted <= set(txids):
        raise ValueError("a matched transaction is not in the block")
    bits: list[bool] = []
    out: list[bytes] = []

    def build(height: int, pos: int) -> None:
        start, end = pos << height, min((pos + 1) << height, len(hashes))
        parent_of_match = any(match[start:end])
        bits.append(parent_of_match)
        if height == 0 or not parent_of_match:
            out.append(_calc_hash(height, pos, hashes))
            return
        build(height - 1, pos * 2)
        if pos * 2 + 1 < _width(len(hashes), height - 1):
            build(height - 1, pos * 2 + 1)

    build(_tree_height(len(hashes)), 0)
    flags = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        flags[i // 8] |= int(bit) << (i % 8)
    return (
        header
        + len(hashes).to_bytes(4, "little")
        + _compact_size(len(out))
        + b"".join(out)
        + _compact_size(len(flags))
        + bytes(flags)
    )


def _read_compact(raw: bytes, off: int) -> tuple[int, int]:
    first = raw[off]
    if first < 0xFD:
        return first, off + 1
    size = {0xFD: 2, 0xFE: 4, 0xFF: 8}[first]
    return int.from_bytes(raw[off + 1 : off + 1 + size], "little"), off + 1 + size


@dataclass(frozen=True)
class MerkleBlockProof:
    header: BlockHeader
    matched: tuple[str, ...]  # txids (display order) the proof shows are in the block


def read_merkle_block(hex_text: object) -> MerkleBlockProof:
    """Parse a `CMerkleBlock` and check its partial tree as Core's `ExtractMatches` does
    (every bit and hash used, no duplicated right child: CVE-2012-2459), and that the
    root it yields is the one in its header."""
    where = "merkle_proof"
    try:
        raw = bytes.fromhex(str(hex_text))
        header = BlockHeader(raw[:HEADER_SIZE])
        if len(header.raw) != HEADER_SIZE:
            raise ValueError
        count = int.from_bytes(raw[80:84], "little")
        n_hashes, off = _read_compact(raw, 84)
        hashes = []
        for _ in range(n_hashes):
            hashes.append(raw[off : off + 32])
            off += 32
        n_flags, off = _read_compact(raw, off)
        flags = raw[off : off + n_flags]
        if len(flags) != n_flags or any(len(h) != 32 for h in hashes) or off + n_flags != len(raw):
            raise ValueError
    except (ValueError, IndexError, KeyError):
        raise ProofInvalid("a Merkle proof is not a serialized CMerkleBlock", field=where) from None
    bits = [bool(flags[i // 8] >> (i % 8) & 1) for i in range(len(flags) * 8)]
    if count == 0 or count > MAX_BLOCK_TXS or len(hashes) > count or len(bits) < len(hashes):
        raise ProofInvalid("a Merkle proof's counts are impossible", field=where)
    used = {"bits": 0, "hashes": 0}
    matched: list[str] = []

    def extract(height: int, pos: int) -> bytes:
        if used["bits"] >= len(bits):
            raise ProofInvalid("a Merkle proof runs out of flag bits", field=where)
        parent_of_match = bits[used["bits"]]
        used["bits"] += 1
        if height == 0 or not parent_of_match:
            if used["hashes"] >= len(hashes):
                raise ProofInvalid("a Merkle proof runs out of hashes", field=where)
            value = hashes[used["hashes"]]
            used["hashes"] += 1
            if height == 0 and parent_of_match:
                matched.append(value[::-1].hex())
            return value
        left = extract(height - 1, pos * 2)
        if pos * 2 + 1 < _width(count, height - 1):
            right = extract(height - 1, pos * 2 + 1)
            if right == left:
                raise ProofInvalid("a Merkle proof duplicates a subtree", field=where)
        else:
            right = left
        return sha256d(left + right)

    root = extract(_tree_height(count), 0)
    if (used["bits"] + 7) // 8 != len(flags) or used["hashes"] != len(hashes):
        raise ProofInvalid("a Merkle proof has unused bits or hashes", field=where)
    if root != header.merkle_root:
        raise ProofInvalid(
            "a Merkle proof's root is not the Merkle root in its block header", field=where
        )
    return MerkleBlockProof(header, tuple(matched))


# -- the Merkle-sum tree over loans -------------------------------------------------------


@dataclass(frozen=True)
class SumNode:
    hash: bytes
    sum: int


def loan_salt(descriptor: str, height: int) -> bytes:
    """A loan's leaf salt at a height: derived from its descriptor (its xpubs), which the
    loan's parties know and outsiders holding only a path do not, so a miner recomputes
    its own leaf and nobody can test guesses of another loan's amount."""
    return tagged_hash(SALT_TAG, descriptor.encode() + height.to_bytes(8, "little"))


def _amount(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SATS:
        raise ProofInvalid(f"{what} is not an amount of sats", field="amount_sats")
    return value


def leaf(loan_id: int, descriptor: str, amount_sats: int, salt: bytes) -> SumNode:
    """A loan's leaf: its id, its descriptor's BIP-380 checksum, its amount, its salt."""
    _, hash_sign, checksum = descriptor.partition("#")
    if not hash_sign or len(checksum) != 8 or len(salt) != 32:
        raise ProofInvalid("a leaf needs a descriptor with its checksum and a 32-byte salt")
    amount = _amount(amount_sats, "a loan's amount")
    message = loan_id.to_bytes(8, "big") + checksum.encode() + amount.to_bytes(8, "big") + salt
    return SumNode(tagged_hash(LEAF_TAG, message), amount)


def parent(left: SumNode, right: SumNode) -> SumNode:
    total = left.sum + right.sum
    message = left.hash + left.sum.to_bytes(8, "big") + right.hash + right.sum.to_bytes(8, "big")
    return SumNode(tagged_hash(NODE_TAG, message), total)


EMPTY_ROOT: Final = SumNode(tagged_hash(EMPTY_TAG, b""), 0)


@dataclass(frozen=True)
class PathStep:
    side: str  # where the sibling is: "left" or "right"
    hash: bytes
    sum: int

    def as_json(self) -> dict[str, Any]:
        return {"side": self.side, "hash": self.hash.hex(), "sum": self.sum}


def sum_tree(leaves: Sequence[SumNode]) -> tuple[SumNode, list[list[PathStep]]]:
    """The root over `leaves` (in order) and each leaf's path to it."""
    if not leaves:
        return EMPTY_ROOT, []
    paths: list[list[PathStep]] = [[] for _ in leaves]
    level = [(node, [i]) for i, node in enumerate(leaves)]
    while len(level) > 1:
        up: list[tuple[SumNode, list[int]]] = []
        for i in range(0, len(level) - 1, 2):
            (left, left_members), (right, right_members) = level[i], level[i + 1]
            for member in left_members:
                paths[member].append(PathStep("right", right.hash, right.sum))
            for member in right_members:
                paths[member].append(PathStep("left", left.hash, left.sum))
            up.append((parent(left, right), left_members + right_members))
        if len(level) % 2:
            up.append(level[-1])  # carried up unchanged
        level = up
    return level[0][0], paths


def path_root(start: SumNode, path: Sequence[PathStep]) -> SumNode:
    node = start
    for step in path:
        if step.side not in ("left", "right"):
            raise ProofInvalid("a path step's side is neither left nor right", field="inclusion")
        sibling = SumNode(step.hash, _amount(step.sum, "a path's sum"))
        node = parent(sibling, node) if step.side == "left" else parent(node, sibling)
        if node.sum > MAX_SATS:
            raise ProofInvalid("a path's sums exceed every bitcoin", field="inclusion")
    return node


def read_path(value: object) -> list[PathStep]:
    if not isinstance(value, list):
        raise ProofInvalid("an inclusion path is not a list", field="inclusion")
    steps = []
    for item in value:
        if not isinstance(item, dict) or item.get("side") not in ("left", "right"):
            raise ProofInvalid("an inclusion path step is malformed", field="inclusion")
        steps.append(
            PathStep(
                str(item["side"]),
                _hex32(item.get("hash"), "inclusion"),
                _amount(item.get("sum"), "a path's sum"),
            )
        )
    return steps


def _hex32(value: object, where: str) -> bytes:
    try:
        raw = bytes.fromhex(str(value))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ProofInvalid(f"{where}: not a 32-byte hash in hex", field=where)
    return raw


# -- what the verifier asks a node ---------------------------------------------------------


class ChainView(Protocol):
    """What a node answers about its active chain (the verifier's only I/O)."""

    def tip_height(self) -> int: ...
    def block_hashes(self, heights: Sequence[int]) -> list[str]:
        """The active chain's block hashes at `heights` (all at or below the tip)."""
        ...

    def outpoint_state(self, txid: str, vout: int, height: int) -> str | None:
        """`unspent` (now), `spent_after` (spent above `height`), `spent` (at or below
        it), or None when the node cannot tell."""
        ...


# -- verification ------------------------------------------------------------------------


@dataclass
class Verdict:
    """Every check made, and the failures; `ok` when none failed."""

    checks: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    total_sats: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures and not self.unknown

    def check(self, passed: bool, what: str) -> bool:
        (self.checks if passed else self.failures).append(what)
        return passed

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "total_sats": self.total_sats,
            "checks": len(self.checks),
            "failures": self.failures,
            "unknown": self.unknown,
        }


def _get(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProofInvalid(f"the document's {key!r} is missing or of the wrong type", field=key)
    return value


def verify_document(
    doc: Mapping[str, Any],
    chain: ChainView | None = None,
    *,
    leaf_of: int | None = None,
    as_of_height: bool = False,
    challenge: str | None = None,
) -> Verdict:
    """Check a document; against `chain` when given (block hashes, outpoints unspent at H).

    `leaf_of`: a miner's check of one loan (its leaf recomputed from its own descriptor
    and outpoints, and its path to the root); otherwise, for a `book` document, the whole
    tree is recomputed from the loans and must give the root and the total.

    An outpoint spent above the height fails too, unless `as_of_height`: then the
    document is judged as a statement about that height only. `challenge`: every loan
    checked must carry a control proof (checked with the loan) for this challenge."""
    verdict = Verdict()
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ProofInvalid(f"not a {FORMAT} document of version {VERSION}", field="format")
    network = check_network(_get(doc, "network", str))
    height = _get(doc, "height", int)
    headers_doc = _get(doc, "headers", dict)
    from_height = _get(headers_doc, "from_height", int)
    headers = [parse_header(h) for h in _get(headers_doc, "hex", list)]
    if not headers or from_height + len(headers) - 1 != height:
        raise ProofInvalid("the headers do not run up to the proof's height", field="headers")
    by_height = {from_height + i: h for i, h in enumerate(headers)}
    try:
        check_header_chain(headers)
        verdict.check(True, "headers link and meet their targets")
    except ProofInvalid as exc:
        verdict.check(False, exc.message)
    verdict.check(
        headers[-1].hash == doc.get("block_hash"), "the last header is the block at the height"
    )
    if chain is not None:
        _check_against_node(verdict, chain, by_height)

    loans = _get(doc, "loans", list)
    tree = _get(doc, "tree", dict)
    root = SumNode(_hex32(tree.get("root"), "tree"), _amount(tree.get("total_sats"), "the total"))
    leaves: list[SumNode] = []
    seen: set[tuple[str, int]] = set()  # across loans: one coin is counted once in the book
    for entry in loans:
        if not isinstance(entry, dict):
            raise ProofInvalid("a loan entry is not an object", field="loans")
        if leaf_of is not None and entry.get("loan_id") != leaf_of:
            continue
        leaves.append(
            _verify_loan(
                verdict, entry, network, height, by_height, chain, root, as_of_height, seen
            )
        )
        if challenge is not None:
            control = entry.get("control_proof")
            verdict.check(
                isinstance(control, dict) and control.get("challenge") == challenge,
                f"loan {entry.get('loan_id')}: a control proof for the auditor's challenge",
            )
    if leaf_of is not None and not leaves:
        verdict.check(False, f"loan {leaf_of} is not in the document")
    if doc.get("scope") == "book" and leaf_of is None:
        ids = [e.get("loan_id") for e in loans]
        verdict.check(ids == sorted(set(ids)), "the loans are in id order, each once")
        computed, _ = sum_tree(leaves)
        verdict.check(computed.hash == root.hash, "the loans' leaves give the tree's root")
        verdict.check(computed.sum == root.sum, "the loans' amounts add up to the tree's total")
        verdict.check(tree.get("leaves") == len(leaves), "the tree has one leaf per loan")
    verdict.total_sats = root.sum
    return verdict


def _check_against_node(
    verdict: Verdict, chain: ChainView, by_height: Mapping[int, BlockHeader]
) -> None:
    tip = chain.tip_height()
    for height in by_height:
        if height > tip:
            verdict.check(False, f"the node's chain does not reach height {height}")
            return
    heights = sorted(by_height)
    hashes = dict(zip(heights, chain.block_hashes(heights), strict=True))
    mismatched = [h for h in heights if hashes[h] != by_height[h].hash]
    verdict.check(
        not mismatched,
        "every header is the node's block at its height"
        if not mismatched
        else f"the headers at heights {mismatched[:5]} are not the node's blocks",
    )


def _verify_loan(
    verdict: Verdict,
    entry: Mapping[str, Any],
    network: str,
    height: int,
    by_height: Mapping[int, BlockHeader],
    chain: ChainView | None,
    root: SumNode,
    as_of_height: bool,
    seen: set[tuple[str, int]],
) -> SumNode:
    loan_id = _get(entry, "loan_id", int)
    descriptor_text = _get(entry, "descriptor", str)
    descriptor = parse_collateral_descriptor(descriptor_text, check_network(network))
    if descriptor.descriptor != descriptor_text:
        raise ProofInvalid(f"loan {loan_id}: the descriptor is not in canonical form")
    total = 0
    for item in _get(entry, "outpoints", list):
        if not isinstance(item, dict):
            raise ProofInvalid(f"loan {loan_id}: an outpoint is not an object", field="outpoints")
        total += _verify_outpoint(
            verdict, loan_id, item, descriptor, height, by_height, chain, seen, as_of_height
        )
    verdict.check(
        entry.get("amount_sats") == total, f"loan {loan_id}: its amount is its outpoints' sum"
    )
    control = entry.get("control_proof")
    if control is not None:
        if not isinstance(control, dict):
            raise ProofInvalid(f"loan {loan_id}: the control proof is not an object")
        coins = [
            ProofCoin(
                o["txid"], o["vout"], o["amount_sats"], o["address_index"], o["change"] is True
            )
            for o in entry["outpoints"]
        ]
        problems = check_control_proof(
            str(control.get("psbt")), str(control.get("challenge")), descriptor_text, network, coins
        )
        verdict.check(
            not problems,
            f"loan {loan_id}: its control proof holds"
            if not problems
            else f"loan {loan_id}: its control proof fails: " + "; ".join(problems),
        )
    salt = loan_salt(descriptor_text, height)
    node = leaf(loan_id, descriptor_text, total, salt)
    inclusion = _get(entry, "inclusion", dict)
    verdict.check(
        inclusion.get("leaf") == node.hash.hex(), f"loan {loan_id}: its leaf is recomputed"
    )
    reached = path_root(node, read_path(inclusion.get("path")))
    verdict.check(
        reached == root, f"loan {loan_id}: its inclusion path leads to the tree's root and total"
    )
    return node


def _verify_outpoint(
    verdict: Verdict,
    loan_id: int,
    item: Mapping[str, Any],
    descriptor: Any,
    height: int,
    by_height: Mapping[int, BlockHeader],
    chain: ChainView | None,
    seen: set[tuple[str, int]],
    as_of_height: bool,
) -> int:
    txid, vout = _get(item, "txid", str), _get(item, "vout", int)
    name = f"loan {loan_id}: {txid}:{vout}"
    amount = _amount(item.get("amount_sats"), f"{name} amount")
    verdict.check((txid, vout) not in seen, f"{name} is listed once in the document")
    seen.add((txid, vout))
    try:
        tx = Transaction.from_string(str(item.get("raw_tx")))
    except Exception:
        verdict.check(False, f"{name}: the raw transaction does not parse")
        return amount
    verdict.check(tx.txid().hex() == txid, f"{name}: the raw transaction has this txid")
    if not verdict.check(0 <= vout < len(tx.vout), f"{name}: the transaction has this output"):
        return amount
    output = tx.vout[vout]
    verdict.check(output.value == amount, f"{name}: the output's amount is the one listed")
    index, change = _get(item, "address_index", int), item.get("change") is True
    script = descriptor.script_pubkey(index, change)
    verdict.check(
        bytes(output.script_pubkey.data) == script,
        f"{name}: the output pays the descriptor's script at index {index}",
    )
    block_height = _get(item, "block_height", int)
    try:
        proof = read_merkle_block(item.get("merkle_proof"))
    except ProofInvalid as exc:
        verdict.check(False, f"{name}: {exc.message}")
        return amount
    verdict.check(txid in proof.matched, f"{name}: the Merkle proof includes the transaction")
    header = by_height.get(block_height)
    verdict.check(
        header is not None and header.raw == proof.header.raw,
        f"{name}: the proof's block is the header at height {block_height}",
    )
    verdict.check(block_height <= height, f"{name}: confirmed at or before the height")
    if chain is not None:
        state = chain.outpoint_state(txid, vout, height)
        if state is None:
            verdict.unknown.append(f"{name}: the node cannot tell whether it was unspent")
        elif state == "spent_after" and not as_of_height:
            verdict.check(False, f"{name}: spent since height {height}")
        else:
            verdict.check(state != "spent", f"{name}: unspent at height {height}")
    return amount


def outpoint_entry(
    *,
    txid: str,
    vout: int,
    amount_sats: int,
    address_index: int,
    change: bool,
    block_height: int,
    raw_tx: bytes,
    merkle_proof: bytes,
) -> dict[str, Any]:
    return {
        "txid": txid,
        "vout": vout,
        "amount_sats": amount_sats,
        "address_index": address_index,
        "change": change,
        "block_height": block_height,
        "raw_tx": raw_tx.hex(),
        "merkle_proof": merkle_proof.hex(),
    }


def assemble(
    *,
    network: str,
    height: int,
    block_hash: str,
    headers_from: int,
    headers: Sequence[bytes],
    book: Sequence[tuple[int, str, list[dict[str, Any]]]],
    only: Callable[[int], bool] | None = None,
) -> dict[str, Any]:
    """The document: `book` is every loan's (id, descriptor, outpoints) at the height in
    id order; the tree covers all of them, `only` picks the loans whose entries are shown
    (scope `loan` when it is given)."""
    leaves = [
        leaf(
            loan_id,
            descriptor,
            sum(o["amount_sats"] for o in outpoints),
            loan_salt(descriptor, height),
        )
        for loan_id, descriptor, outpoints in book
    ]
    root, paths = sum_tree(leaves)
    loans = [
        {
            "loan_id": loan_id,
            "descriptor": descriptor,
            "amount_sats": node.sum,
            "outpoints": outpoints,
            "inclusion": {"leaf": node.hash.hex(), "path": [s.as_json() for s in path]},
        }
        for (loan_id, descriptor, outpoints), node, path in zip(book, leaves, paths, strict=True)
        if only is None or only(loan_id)
    ]
    return {
        "format": FORMAT,
        "version": VERSION,
        "network": network,
        "height": height,
        "block_hash": block_hash,
        "scope": "book" if only is None else "loan",
        "headers": {"from_height": headers_from, "hex": [h.hex() for h in headers]},
        "loans": loans,
        "tree": {"root": root.hash.hex(), "total_sats": root.sum, "leaves": len(leaves)},
    }


# -- the control proof (BIP-127 style) ----------------------------------------------------
#
# A transaction over the loan's coins whose FIRST input spends the "commitment input":
# txid = SHA-256("Proof-of-Reserves: " + challenge) (BIP-127; the digest's bytes are the
# outpoint hash as serialized, as BDK's bdk-reserves writes it), index 0, no script.
# No such output can exist (its txid would be a double SHA-256 with a 19-byte ASCII
# prefix as the inner preimage), so the transaction is never valid; each other input is
# signed SIGHASH_ALL, which commits to every input, so no signature in it can be reused
# in a transaction that could be mined. The one output is the inputs' exact sum (no fee,
# BIP-127) to a bare OP_RETURN (BIP-127 leaves the script open: this one pays nobody).

BIP127_PREFIX: Final = b"Proof-of-Reserves: "
PSBT_IN_POR_COMMITMENT: Final = b"\x09"
CONTROL_OUTPUT_SCRIPT: Final = b"\x6a"  # OP_RETURN
COMMITMENT_UTXO_SCRIPT: Final = b"\x51"  # OP_TRUE: the commitment input's assumed UTXO
MAX_CHALLENGE_BYTES: Final = 500


def bip127_commitment(challenge: str) -> bytes:
    """The commitment input's outpoint hash, as serialized in the transaction."""
    if not isinstance(challenge, str) or not challenge.strip():
        raise ProofInvalid("the challenge is empty", field="challenge")
    message = challenge.encode("utf-8")
    if len(message) > MAX_CHALLENGE_BYTES:
        raise ProofInvalid("the challenge is too long", field="challenge")
    return hashlib.sha256(BIP127_PREFIX + message).digest()


@dataclass(frozen=True)
class ProofCoin:
    txid: str
    vout: int
    amount_sats: int
    address_index: int
    change: bool


def control_proof_psbt(
    descriptor_text: str, network: str, coins: Sequence[ProofCoin], challenge: str
) -> str:
    """The unsigned control-proof PSBT (base64) over `coins`: commitment input first (with
    BIP-127's PSBT_IN_POR_COMMITMENT field), then each coin with its witness UTXO, witness
    script and BIP-32 derivations, one OP_RETURN output of the coins' sum."""
    from embit.ec import PublicKey
    from embit.psbt import PSBT, DerivationPath
    from embit.script import Script
    from embit.transaction import TransactionInput, TransactionOutput

    descriptor = parse_collateral_descriptor(descriptor_text, check_network(network))
    commitment = bip127_commitment(challenge)
    vin = [TransactionInput(commitment[::-1], 0, sequence=0xFFFFFFFF)]
    vin += [TransactionInput(bytes.fromhex(c.txid), c.vout, sequence=0xFFFFFFFF) for c in coins]
    total = sum(c.amount_sats for c in coins)
    tx = Transaction(
        version=2, vin=vin, vout=[TransactionOutput(total, Script(CONTROL_OUTPUT_SCRIPT))]
    )
    psbt = PSBT(tx)
    psbt.inputs[0].unknown = {PSBT_IN_POR_COMMITMENT: challenge.encode("utf-8")}
    # What bdk-reserves writes too: signers that look at every input's UTXO (embit, many
    # hardware wallets) see a 0-sat OP_TRUE, as BIP-127 tells them to assume.
    psbt.inputs[0].witness_utxo = TransactionOutput(0, Script(COMMITMENT_UTXO_SCRIPT))
    for inp, coin in zip(psbt.inputs[1:], coins, strict=True):
        spk = descriptor.script_pubkey(coin.address_index, coin.change)
        inp.witness_utxo = TransactionOutput(coin.amount_sats, Script(spk))
        inp.witness_script = Script(descriptor.witness_script(coin.address_index, coin.change))
        for key in descriptor.hd_keys:
            fingerprint, path = key.derivation(int(coin.change), coin.address_index)
            pub = PublicKey.parse(key.public_key(int(coin.change), coin.address_index))
            inp.bip32_derivations[pub] = DerivationPath(fingerprint, path)
    out: str = psbt.to_string()
    return out


def check_control_proof(
    psbt_b64: str, challenge: str, descriptor_text: str, network: str, coins: Sequence[ProofCoin]
) -> list[str]:
    """What is wrong with a control proof over exactly `coins` (empty: it holds). Each
    coin's input must carry valid SIGHASH_ALL signatures (BIP-143 digests computed by
    embit) of two distinct keys of the descriptor's 2-of-3 script at its index, which is
    what the script's CHECKMULTISIG needs; the script is not run by an interpreter."""
    from embit.ec import PublicKey, Signature
    from embit.psbt import PSBT
    from embit.script import Script
    from embit.transaction import SIGHASH

    problems: list[str] = []
    try:
        psbt = PSBT.from_string(psbt_b64.strip())
        commitment = bip127_commitment(challenge)
        descriptor = parse_collateral_descriptor(descriptor_text, check_network(network))
    except ProofInvalid as exc:
        return [exc.message]
    except Exception:
        return ["the control proof is not a PSBT of this loan's descriptor"]
    tx = psbt.tx
    if not tx.vin or tx.vin[0].txid[::-1] != commitment or tx.vin[0].vout != 0:
        problems.append("its first input is not the commitment to the challenge")
    by_outpoint = {(c.txid, c.vout): c for c in coins}
    spent = [(i.txid.hex(), int(i.vout)) for i in tx.vin[1:]]
    if sorted(spent) != sorted(by_outpoint) or len(set(spent)) != len(spent):
        problems.append("its other inputs are not exactly the loan's outpoints")
    total = sum(c.amount_sats for c in coins)
    if len(tx.vout) != 1 or tx.vout[0].value != total:
        problems.append("it does not have one output of exactly the coins' sum")
    elif tx.vout[0].script_pubkey.data != CONTROL_OUTPUT_SCRIPT:
        problems.append("its output is not a bare OP_RETURN")
    for n, (inp, outpoint) in enumerate(zip(psbt.inputs[1:], spent, strict=True), start=1):
        coin = by_outpoint.get(outpoint)
        if coin is None:
            continue
        script = descriptor.witness_script(coin.address_index, coin.change)
        digest = tx.sighash_segwit(n, Script(script), coin.amount_sats, SIGHASH.ALL)
        # The 2-of-3 script's keys: OP_2 <33> <33> <33> OP_3 OP_CHECKMULTISIG.
        keys = [PublicKey.parse(script[2 + 34 * i : 35 + 34 * i]) for i in range(3)]
        sigs = list(inp.partial_sigs.values())
        if inp.final_scriptwitness is not None:  # finalized: [empty, sig, sig, script]
            sigs += list(inp.final_scriptwitness.items[1:-1])
        signers = set()
        for sig in sigs:
            if not sig or sig[-1] != SIGHASH.ALL:
                continue
            for key in keys:
                try:
                    if key.verify(Signature.parse(sig[:-1]), digest):
                        signers.add(key.sec())
                except Exception:
                    continue
        if len(signers) < 2:
            problems.append(
                f"input {n} ({outpoint[0]}:{outpoint[1]}) has {len(signers)} valid signature(s) "
                "of the loan's keys, not 2"
            )
    return problems


def attach_control_proof(
    doc: Mapping[str, Any], loan_id: int, challenge: str, psbt_b64: str
) -> dict[str, Any]:
    """The document with `psbt_b64` as the loan's control proof, once it holds over exactly
    the loan's outpoints in the document (else ProofInvalid naming what is wrong)."""
    out = dict(doc)
    out["loans"] = [dict(e) for e in _get(doc, "loans", list)]
    for entry in out["loans"]:
        if entry.get("loan_id") != loan_id:
            continue
        coins = [
            ProofCoin(o["txid"], o["vout"], o["amount_sats"], o["address_index"], o["change"])
            for o in entry["outpoints"]
        ]
        problems = check_control_proof(
            psbt_b64, challenge, str(entry["descriptor"]), str(doc["network"]), coins
        )
        if problems:
            raise ProofInvalid("the control proof does not hold: " + "; ".join(problems))
        entry["control_proof"] = {"challenge": challenge, "psbt": psbt_b64.strip()}
        return out
    raise ProofInvalid(f"loan {loan_id} is not in the document", field="loan_id")
