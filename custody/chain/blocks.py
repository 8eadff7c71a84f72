"""Raw block and transaction scanner for the deposit watcher.

The watcher fetches every block raw (`getblock <hash> 0`) and only needs two
things from it: outputs paying a watched collateral script and inputs spending
a watched collateral outpoint. A full parse (one object per input, output and
witness item, plus a txid for every transaction) is what makes a generic
library slow on a 2 MB block, so this is the one place the design parses the
wire format itself: it walks the bytes with integer offsets, looks each
scriptPubKey and each 36-byte outpoint up in the caller's containers, and
hashes a transaction (double SHA-256) only when it matched something.

Hashes are returned as hex in the usual reversed (display) order. Anything
that is not exactly a well-formed block (truncated, trailing bytes, counts
that cannot fit in the remaining bytes, a bad segwit flag, a non-canonical
compact size) raises `MalformedBlock`, never a bare IndexError.

Watched sets: any `Container[bytes]` works (a set, a frozenset, a dict keyed by
script), but the watcher passes a `ScriptIndex`: measured on CPython 3.11, 1,000,000
P2WSH scripts cost ~111 MB as a set (a bytes object and a hash-table slot each) and
~150 MB as a dict to small ints, while the index holds them exact in ~45 MB. The
scanner reads the index's bit filter inline (no Python-level `__contains__` per
output) and skips outputs of a length no watched script has without slicing them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass

__all__ = [
    "BlockScan",
    "FoundOutput",
    "FoundSpend",
    "MalformedBlock",
    "MalformedTransaction",
    "ScriptIndex",
    "TxScan",
    "header_hash",
    "outpoint_key",
    "scan_block",
    "scan_transaction",
]

HEADER_SIZE = 80
# Bitcoin Core's MAX_SIZE: no compact size in a valid message is larger.
_MAX_COMPACT_SIZE = 0x02000000
# Smallest possible serialisations, used to reject counts that cannot fit.
_MIN_INPUT_SIZE = 41  # 32 txid + 4 vout + 1 script length + 4 sequence
_MIN_OUTPUT_SIZE = 9  # 8 value + 1 script length
_MIN_TX_SIZE = 4 + 1 + _MIN_INPUT_SIZE + 1 + _MIN_OUTPUT_SIZE + 4

_sha256 = hashlib.sha256


class MalformedBlock(ValueError):
    """The bytes are not a well-formed block: the node or the transport is broken.

    A ValueError so generic callers can catch it; `offset` points at the byte
    where parsing gave up (None when unknown), to make hex dumps debuggable.
    """

    def __init__(self, reason: str, offset: int | None = None) -> None:
        super().__init__(reason if offset is None else f"{reason} (at byte {offset})")
        self.reason = reason
        self.offset = offset


class MalformedTransaction(MalformedBlock):
    """A lone (mempool) transaction is not well formed."""


@dataclass(frozen=True, slots=True)
class FoundOutput:
    """An output paying a watched script; `value` in satoshis."""

    txid: str
    vout: int
    script_pubkey: bytes
    value: int


@dataclass(frozen=True, slots=True)
class FoundSpend:
    """An input of transaction `txid` (at position `vin`) spending a watched outpoint."""

    txid: str
    vin: int
    prev_txid: str
    prev_vout: int

    @property
    def outpoint(self) -> bytes:
        """The spent outpoint as the 36-byte key used in the watched-outpoint set."""
        return outpoint_key(self.prev_txid, self.prev_vout)


@dataclass(frozen=True, slots=True)
class TxScan:
    """What one transaction did to the watched sets.

    `index` is the transaction's position in its block (0 for a lone mempool
    transaction), so the watcher can order events inside a block.
    """

    txid: str
    index: int
    outputs: tuple[FoundOutput, ...]
    spends: tuple[FoundSpend, ...]

    @property
    def matched(self) -> bool:
        return bool(self.outputs or self.spends)


@dataclass(frozen=True, slots=True)
class BlockScan:
    """The header facts the watcher's cursor needs, and every match in the block.

    `transactions` holds only the transactions that matched, in block order
    (the same matches as the flat `outputs`/`spends`, grouped per tx).
    `txids` is every txid in block order, computed only when asked for
    (`with_txids=True`), because hashing all of them is most of the cost.
    """

    block_hash: str
    prev_block_hash: str
    merkle_root: str
    timestamp: int
    tx_count: int
    outputs: tuple[FoundOutput, ...]
    spends: tuple[FoundSpend, ...]
    transactions: tuple[TxScan, ...]
    txids: tuple[str, ...] | None = None


def outpoint_key(txid_hex: str, vout: int) -> bytes:
    """The 36-byte watched-outpoint key: txid in wire (little-endian) order + vout LE.

    This is exactly the 36 bytes an input carries on the wire, so the scanner
    can look a slice of the raw block up without decoding it.
    """
    if len(txid_hex) != 64:
        raise ValueError(f"txid must be 64 hex characters, got {len(txid_hex)}")
    if not 0 <= vout <= 0xFFFFFFFF:
        raise ValueError(f"vout out of range: {vout}")
    return bytes.fromhex(txid_hex)[::-1] + vout.to_bytes(4, "little")


_BIT = tuple(1 << i for i in range(8))


class ScriptIndex:
    """A set of scriptPubKeys, exact and compact: the watcher's million addresses.

    The scripts of one length lie back to back in one `bytearray`, found through an
    open-addressing table of their positions (`array("I")`, about two slots per
    script); in front of both, a bit filter of 32 bits per script answers "no" for ~97%
    of the scripts a block pays without a probe. No object per script and no small
    allocations: 1,000,000 P2WSH scripts take 34 MB of scripts, 8 MB of slots and
    4 MB of filter (a set took ~110 MB, a dict to address ids ~170 MB). It only grows
    (addresses are never reused or deleted); past its capacity it is rebuilt at twice
    the size. `hash()` is salted per process, so nobody can aim outputs at the filter.
    """

    __slots__ = ("_capacity", "_count", "_filter", "_filter_mask", "_tables", "lengths")

    MIN_CAPACITY = 1024
    FILTER_BITS_PER_SCRIPT = 32

    def __init__(self, scripts: Iterable[bytes] = (), *, capacity: int = 0) -> None:
        self._count = 0
        self._tables: dict[int, _ScriptTable] = {}
        self._allocate(capacity)
        for script in scripts:
            self.add(script)

    def _allocate(self, capacity: int) -> None:
        self._capacity = max(capacity, self.MIN_CAPACITY)
        size = _power_of_two(self._capacity * self.FILTER_BITS_PER_SCRIPT // 8)
        self._filter = bytearray(size)
        self._filter_mask = size - 1
        self.lengths: set[int] = set()

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` scripts at once (one rebuild instead of several)."""
        if capacity > self._capacity:
            self._rebuild(capacity)

    def _rebuild(self, capacity: int) -> None:
        """A larger filter and tables; the scripts stay where they are."""
        self._allocate(capacity)
        for width, table in self._tables.items():
            table.reserve(self._capacity)
            for script in table.scripts():
                h = hash(script)
                self._filter[(h >> 3) & self._filter_mask] |= _BIT[h & 7]
            self.lengths.add(width)

    def add(self, script: bytes) -> bool:
        """Watch `script`; False if it was watched already."""
        return self.update((script,)) == 1

    def update(self, scripts: Iterable[bytes]) -> int:
        """Watch every script of `scripts`; how many were new."""
        added = 0
        for script in scripts:
            width = len(script)
            if width == 0:
                raise ValueError("a watched script is not empty")
            h = hash(script)
            table = self._tables.get(width)
            if table is None:
                table = self._tables[width] = _ScriptTable(width, self._capacity)
                self.lengths.add(width)
            elif table.find(script, h):
                continue
            if self._count >= self._capacity:
                self._rebuild(2 * self._capacity)
            table.add(script, h)
            self._filter[(h >> 3) & self._filter_mask] |= _BIT[h & 7]
            self._count += 1
            added += 1
        return added

    def _holds(self, script: bytes, h: int) -> bool:
        """Exact check behind the filter; `h` is `hash(script)`."""
        if not self._filter[(h >> 3) & self._filter_mask] & _BIT[h & 7]:
            return False
        table = self._tables.get(len(script))
        return table is not None and table.find(script, h)

    def __contains__(self, script: object) -> bool:
        if not isinstance(script, bytes) or len(script) not in self.lengths:
            return False
        return self._holds(script, hash(script))

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[bytes]:
        for table in self._tables.values():
            yield from table.scripts()


class _ScriptTable:
    """Scripts of one width back to back in `data`, and an open-addressing table of
    their positions (`slots`: 0 empty, else position + 1; linear probing, at most half
    full)."""

    __slots__ = ("count", "data", "mask", "slots", "width")

    def __init__(self, width: int, capacity: int) -> None:
        self.width = width
        self.count = 0
        self.data = bytearray(width * capacity)  # filled from the front; grows by doubling
        size = _power_of_two(2 * capacity)
        self.slots = array("I", bytes(4 * size))
        self.mask = size - 1

    def find(self, script: bytes, h: int) -> bool:
        data, slots, mask, width = self.data, self.slots, self.mask, self.width
        i = h & mask
        while True:
            at = slots[i]
            if not at:
                return False
            start = (at - 1) * width
            if data[start : start + width] == script:
                return True
            i = (i + 1) & mask

    def add(self, script: bytes, h: int) -> None:
        """Store a script that is not in the table yet."""
        if 2 * (self.count + 1) > len(self.slots):
            self.reserve(2 * self.count + 2)
        start = self.count * self.width
        if start + self.width > len(self.data):
            self.data.extend(bytes(max(len(self.data), self.width)))
        self.data[start : start + self.width] = script
        self.count += 1
        self._place(h, self.count)

    def reserve(self, capacity: int) -> None:
        """Room for `capacity` scripts: the data extended, the slots rehashed."""
        if len(self.data) < capacity * self.width:
            self.data.extend(bytes(capacity * self.width - len(self.data)))
        size = _power_of_two(2 * capacity)
        if size <= len(self.slots):
            return
        self.slots, self.mask = array("I", bytes(4 * size)), size - 1
        for n, script in enumerate(self.scripts(), start=1):
            self._place(hash(script), n)

    def _place(self, h: int, at: int) -> None:
        slots, mask = self.slots, self.mask
        i = h & mask
        while slots[i]:
            i = (i + 1) & mask
        slots[i] = at

    def scripts(self) -> Iterator[bytes]:
        """Each script, one at a time (a list of a million would cost what the table saves)."""
        data, width = self.data, self.width
        for start in range(0, self.count * width, width):
            yield bytes(data[start : start + width])


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def _hash256_hex(data: bytes) -> str:
    return _sha256(_sha256(data).digest()).digest()[::-1].hex()


def header_hash(raw_header80: bytes) -> str:
    """Block hash (display hex) of an 80-byte header."""
    if len(raw_header80) != HEADER_SIZE:
        raise MalformedBlock(f"block header must be 80 bytes, got {len(raw_header80)}")
    return _hash256_hex(bytes(raw_header80))


def _read_compact(raw: bytes, off: int) -> tuple[int, int]:
    """Slow path of a compact size (first byte >= 0xfd): (value, offset after it).

    The hot loops inline the one-byte case; this handles the rest and rejects
    non-canonical and oversized encodings as Bitcoin Core does.
    """
    first = raw[off]
    if first < 0xFD:
        return first, off + 1
    width = 2 if first == 0xFD else 4 if first == 0xFE else 8
    end = off + 1 + width
    if end > len(raw):
        raise MalformedBlock("truncated compact size", off)
    value = int.from_bytes(raw[off + 1 : end], "little")
    minimum = 0xFD if width == 2 else 0x10000 if width == 4 else 0x100000000
    if value < minimum:
        raise MalformedBlock("non-canonical compact size", off)
    if value > _MAX_COMPACT_SIZE:
        raise MalformedBlock(f"compact size too large: {value}", off)
    return value, end


# One matched transaction, as offsets: (index, start, body, witness_start, end,
# [(vout, output_offset, script_start, script_end)], [(vin, outpoint_offset)]).
_Hit = tuple[int, int, int, int, int, list[tuple[int, int, int, int]], list[tuple[int, int]]]
# Offsets needed to hash any transaction: (start, body, witness_start, end).
_Span = tuple[int, int, int, int]


def _walk(
    raw: bytes,
    off: int,
    count: int,
    scripts: Container[bytes],
    outpoints: Container[bytes],
    spans: list[_Span] | None,
) -> tuple[int, list[_Hit]]:
    """Walk `count` serialised transactions from `off`, collecting matches as offsets.

    Deliberately one flat function with the one-byte compact size inlined:
    function calls and object creation are what a Python parser pays for.
    Reading past the end raises IndexError (caught by the callers); a slice
    past the end is only short, and leaves `off` beyond the end, which the
    callers' final length check turns into MalformedBlock.
    """
    size = len(raw)
    hits: list[_Hit] = []
    # A ScriptIndex is read inline: its length set and bit filter turn most outputs
    # away without a slice, a hash or a call.
    watched = scripts if type(scripts) is ScriptIndex else None
    if watched is not None:
        lengths, bit_filter, filter_mask = watched.lengths, watched._filter, watched._filter_mask
        holds = watched._holds
    for index in range(count):
        start = off
        if raw[off + 4] == 0:  # segwit marker; the flag must be 1
            if raw[off + 5] != 1:
                raise MalformedBlock(f"tx {index}: bad segwit flag {raw[off + 5]}", off + 5)
            body = off = off + 6
        else:
            body = off = off + 4

        n_in = raw[off]
        if n_in < 0xFD:
            off += 1
        else:
            n_in, off = _read_compact(raw, off)
        if n_in == 0:
            raise MalformedBlock(f"tx {index}: no inputs", off)
        if n_in * _MIN_INPUT_SIZE > size - off:
            raise MalformedBlock(f"tx {index}: {n_in} inputs cannot fit", off)
        spent: list[tuple[int, int]] | None = None
        for vin in range(n_in):
            if raw[off : off + 36] in outpoints:
                if spent is None:
                    spent = []
                spent.append((vin, off))
            off += 36
            length = raw[off]
            if length < 0xFD:
                off += length + 5  # length byte + script_sig + sequence
            else:
                length, off = _read_compact(raw, off)
                off += length + 4

        n_out = raw[off]
        if n_out < 0xFD:
            off += 1
        else:
            n_out, off = _read_compact(raw, off)
        if n_out == 0:
            raise MalformedBlock(f"tx {index}: no outputs", off)
        if n_out * _MIN_OUTPUT_SIZE > size - off:
            raise MalformedBlock(f"tx {index}: {n_out} outputs cannot fit", off)
        paid: list[tuple[int, int, int, int]] | None = None
        for vout in range(n_out):
            length = raw[off + 8]
            if length < 0xFD:
                script = off + 9
            else:
                length, script = _read_compact(raw, off + 8)
            script_end = script + length
            if watched is None:
                hit = raw[script:script_end] in scripts
            elif length in lengths:
                key = raw[script:script_end]
                h = hash(key)
                hit = bit_filter[(h >> 3) & filter_mask] & _BIT[h & 7] != 0 and holds(key, h)
            else:
                hit = False
            if hit:
                if paid is None:
                    paid = []
                paid.append((vout, off, script, script_end))
            off = script_end

        witness = off
        if body - start == 6:
            for _ in range(n_in):
                items = raw[off]
                if items < 0xFD:
                    off += 1
                else:
                    items, off = _read_compact(raw, off)
                    if items > size - off:
                        raise MalformedBlock(f"tx {index}: {items} witness items cannot fit", off)
                for _ in range(items):
                    length = raw[off]
                    if length < 0xFD:
                        off += length + 1
                    else:
                        length, off = _read_compact(raw, off)
                        off += length
        off += 4  # locktime

        if spans is not None:
            spans.append((start, body, witness, off))
        if paid is not None or spent is not None:
            hits.append((index, start, body, witness, off, paid or [], spent or []))
    return off, hits


def _txid(raw: bytes, start: int, body: int, witness: int, end: int) -> str:
    """Txid of the transaction at raw[start:end]: hash of its non-witness serialisation."""
    if body - start == 6:
        h = _sha256(raw[start : start + 4])
        h.update(raw[body:witness])
        h.update(raw[end - 4 : end])
        return _sha256(h.digest()).digest()[::-1].hex()
    return _hash256_hex(raw[start:end])


def _build(raw: bytes, hit: _Hit, txid: str | None = None) -> TxScan:
    index, start, body, witness, end, paid, spent = hit
    if txid is None:
        txid = _txid(raw, start, body, witness, end)
    outputs = tuple(
        FoundOutput(txid, vout, raw[s:e], int.from_bytes(raw[o : o + 8], "little"))
        for vout, o, s, e in paid
    )
    spends = tuple(
        FoundSpend(
            txid,
            vin,
            raw[o : o + 32][::-1].hex(),
            int.from_bytes(raw[o + 32 : o + 36], "little"),
        )
        for vin, o in spent
    )
    return TxScan(txid, index, outputs, spends)


def _as_bytes(raw: bytes | bytearray | memoryview) -> bytes:
    # bytes indexing/slicing is the fastest path and hashable slices are needed
    # for set lookups; a bytearray/memoryview is copied once.
    return raw if type(raw) is bytes else bytes(raw)


def scan_block(
    raw: bytes | bytearray | memoryview,
    watched_scripts: Container[bytes],
    watched_outpoints: Container[bytes],
    *,
    with_txids: bool = False,
) -> BlockScan:
    """Find outputs paying `watched_scripts` and inputs spending `watched_outpoints`.

    `watched_scripts` holds raw scriptPubKeys; `watched_outpoints` holds
    `outpoint_key(...)` values. Pass sets or dicts (C-level lookups). With
    `with_txids`, every txid is computed too (slower; for merkle checks/tests).
    """
    data = _as_bytes(raw)
    size = len(data)
    if size < HEADER_SIZE + 1:
        raise MalformedBlock(f"block too short: {size} bytes")
    try:
        off = HEADER_SIZE
        tx_count = data[off]
        if tx_count < 0xFD:
            off += 1
        else:
            tx_count, off = _read_compact(data, off)
        if tx_count == 0:
            raise MalformedBlock("block has no transactions", HEADER_SIZE)
        if tx_count * _MIN_TX_SIZE > size - off:
            raise MalformedBlock(f"{tx_count} transactions cannot fit", HEADER_SIZE)
        spans: list[_Span] | None = [] if with_txids else None
        off, hits = _walk(data, off, tx_count, watched_scripts, watched_outpoints, spans)
    except IndexError:
        raise MalformedBlock("block is truncated") from None
    if off != size:
        if off > size:
            raise MalformedBlock("block is truncated", size)
        raise MalformedBlock(f"{size - off} trailing bytes after the last transaction", off)

    txids: tuple[str, ...] | None = None
    if spans is not None:
        txids = tuple(_txid(data, *span) for span in spans)
    txs = tuple(_build(data, hit, None if txids is None else txids[hit[0]]) for hit in hits)
    return BlockScan(
        block_hash=_hash256_hex(data[:HEADER_SIZE]),
        prev_block_hash=data[4:36][::-1].hex(),
        merkle_root=data[36:68][::-1].hex(),
        timestamp=int.from_bytes(data[68:72], "little"),
        tx_count=tx_count,
        outputs=tuple(o for tx in txs for o in tx.outputs),
        spends=tuple(s for tx in txs for s in tx.spends),
        transactions=txs,
        txids=txids,
    )


def scan_transaction(
    raw_tx: bytes | bytearray | memoryview,
    watched_scripts: Container[bytes],
    watched_outpoints: Container[bytes],
) -> TxScan:
    """Scan one (mempool) transaction; its txid is always computed."""
    data = _as_bytes(raw_tx)
    size = len(data)
    if size < _MIN_TX_SIZE:
        raise MalformedTransaction(f"transaction too short: {size} bytes")
    spans: list[_Span] = []
    try:
        off, hits = _walk(data, 0, 1, watched_scripts, watched_outpoints, spans)
    except IndexError:
        raise MalformedTransaction("transaction is truncated") from None
    except MalformedBlock as exc:
        raise MalformedTransaction(exc.reason, exc.offset) from None
    if off != size:
        if off > size:
            raise MalformedTransaction("transaction is truncated", size)
        raise MalformedTransaction(f"{size - off} trailing bytes after the transaction", off)
    if hits:
        return _build(data, hits[0])
    return TxScan(_txid(data, *spans[0]), 0, (), ())
