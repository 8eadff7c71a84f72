"""The raw block scanner against embit's own parse of the same bytes.

Blocks are built with embit (real keys, real scripts, DER signatures), then
parsed back one transaction at a time with `Transaction.read_from` (embit has
no block parser): the scanner must report the same txids, the same matches and
the same values, and reject anything that is not exactly a block. The watcher's
`ScriptIndex` must give exactly what a set gives, in a third of the memory.
"""

from __future__ import annotations

import hashlib
import io
import random
import tracemalloc
from dataclasses import dataclass

import pytest
from embit import compact, ec
from embit.script import (
    Script,
    Witness,
    multisig,
    p2pkh,
    p2tr,
    p2wpkh,
    p2wsh,
    script_sig_p2pkh,
    witness_p2wpkh,
)
from embit.transaction import Transaction, TransactionInput, TransactionOutput

from custody.chain.blocks import (
    BlockScan,
    FoundOutput,
    FoundSpend,
    MalformedBlock,
    MalformedTransaction,
    ScriptIndex,
    TxScan,
    header_hash,
    outpoint_key,
    scan_block,
    scan_transaction,
)


def hash256(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def merkle_root(txids_display: list[str]) -> str:
    level = [bytes.fromhex(t)[::-1] for t in txids_display]
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [hash256(level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return level[0][::-1].hex()


class Keys:
    """Deterministic real keys, so scripts and signatures are the genuine shapes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def key(self) -> ec.PrivateKey:
        return ec.PrivateKey(self.rng.randbytes(31) + b"\x01")

    def sig(self, key: ec.PrivateKey) -> ec.Signature:
        return key.sign(self.rng.randbytes(32))


def _prevout(rng: random.Random) -> TransactionInput:
    return TransactionInput(rng.randbytes(32), rng.randrange(0, 5), sequence=0xFFFFFFFD)


def make_tx(rng: random.Random, keys: Keys, kind: str) -> Transaction:
    """One transaction of a named shape; outputs mix every common script type."""
    vin: list[TransactionInput] = []
    n_in = rng.randrange(1, 4)
    for _ in range(n_in):
        inp = _prevout(rng)
        key = keys.key()
        if kind == "legacy":
            inp.script_sig = script_sig_p2pkh(keys.sig(key), key.get_public_key())
        elif kind == "p2wpkh":
            inp.witness = witness_p2wpkh(keys.sig(key), key.get_public_key())
        elif kind == "p2wsh":
            others = [keys.key() for _ in range(2)]
            wscript = multisig(2, [k.get_public_key() for k in [key, *others]])
            sigs = [keys.sig(k).serialize() + b"\x01" for k in (key, others[0])]
            inp.witness = Witness([b"", *sigs, wscript.data])
        elif kind == "big":
            # Every compact-size slow path: a 300-byte scriptSig and witness item,
            # a witness with 260 items.
            inp.script_sig = Script(b"\x4d" + (297).to_bytes(2, "little") + rng.randbytes(297))
            inp.witness = Witness([rng.randbytes(300)] + [b""] * 259)
        vin.append(inp)
    n_out = 260 if kind == "big" else rng.randrange(1, 5)
    vout = []
    for _ in range(n_out):
        pub = keys.key().get_public_key()
        script = rng.choice(
            [
                p2wpkh(pub),
                p2wsh(multisig(2, [pub, keys.key().get_public_key()])),
                p2tr(pub),
                p2pkh(pub),
                Script(b"\x6a\x0b" + rng.randbytes(11)),  # OP_RETURN
            ]
        )
        value = 0 if script.data[0] == 0x6A else rng.randrange(0, 21_000_000 * 10**8)
        vout.append(TransactionOutput(value, script))
    if rng.random() < 0.2:
        vout.append(TransactionOutput(0, p2wpkh(keys.key().get_public_key())))  # zero value
    return Transaction(
        version=rng.choice((1, 2)), vin=vin, vout=vout, locktime=rng.randrange(0, 10**6)
    )


def make_coinbase(rng: random.Random, keys: Keys, segwit: bool) -> Transaction:
    witness = Witness([b"\x00" * 32]) if segwit else Witness([])
    cb_in = TransactionInput(
        b"\x00" * 32,
        0xFFFFFFFF,
        Script(b"\x03" + rng.randbytes(3) + rng.randbytes(6)),
        witness=witness,
    )
    outs = [TransactionOutput(625_000_000, p2wpkh(keys.key().get_public_key()))]
    if segwit:
        outs.append(TransactionOutput(0, Script(b"\x6a\x24\xaa\x21\xa9\xed" + rng.randbytes(32))))
    return Transaction(version=2, vin=[cb_in], vout=outs, locktime=0)


@dataclass
class Built:
    raw: bytes
    header: bytes
    txs: list[Transaction]


KINDS = ("legacy", "p2wpkh", "p2wsh", "p2tr_out")


def build_block(seed: int, n_tx: int, kinds: tuple[str, ...] = KINDS) -> Built:
    rng = random.Random(seed)
    keys = Keys(rng)
    txs = [make_coinbase(rng, keys, segwit=True)]
    txs += [make_tx(rng, keys, rng.choice(kinds)) for _ in range(n_tx - 1)]
    root = merkle_root([tx.txid().hex() for tx in txs])
    header = (
        (0x20000000).to_bytes(4, "little")
        + rng.randbytes(32)
        + bytes.fromhex(root)[::-1]
        + rng.randrange(2**32).to_bytes(4, "little")
        + (0x207FFFFF).to_bytes(4, "little")
        + rng.randbytes(4)
    )
    raw = header + compact.to_bytes(len(txs)) + b"".join(tx.serialize() for tx in txs)
    return Built(raw, header, txs)


def embit_parse(raw: bytes) -> list[Transaction]:
    """embit has no block parser: read the transactions one by one after the header."""
    stream = io.BytesIO(raw)
    stream.seek(80)
    txs = [Transaction.read_from(stream) for _ in range(compact.read_from(stream))]
    assert stream.read() == b""
    return txs


def pick_watched(
    rng: random.Random, txs: list[Transaction], share: float
) -> tuple[set[bytes], set[bytes]]:
    """Watch a share of the block's output scripts and spent outpoints, plus decoys."""
    scripts = {b"\x00\x20" + rng.randbytes(32) for _ in range(50)}
    outpoints = {rng.randbytes(36) for _ in range(50)}
    for tx in txs:
        for out in tx.vout:
            if rng.random() < share:
                scripts.add(out.script_pubkey.data)
        for inp in tx.vin:
            if rng.random() < share:
                outpoints.add(outpoint_key(inp.txid.hex(), inp.vout))
    return scripts, outpoints


def expected(
    txs: list[Transaction], scripts: set[bytes], outpoints: set[bytes]
) -> tuple[list[FoundOutput], list[FoundSpend]]:
    """What the scanner must report, computed from embit's objects."""
    outs: list[FoundOutput] = []
    spends: list[FoundSpend] = []
    for tx in txs:
        txid = tx.txid().hex()
        for i, out in enumerate(tx.vout):
            if out.script_pubkey.data in scripts:
                outs.append(FoundOutput(txid, i, out.script_pubkey.data, out.value))
        for i, inp in enumerate(tx.vin):
            if inp.txid[::-1] + inp.vout.to_bytes(4, "little") in outpoints:
                spends.append(FoundSpend(txid, i, inp.txid.hex(), inp.vout))
    return outs, spends


def test_scan_matches_embit_on_a_mixed_block() -> None:
    built = build_block(seed=1, n_tx=60)
    txs = embit_parse(built.raw)
    rng = random.Random(99)
    scripts, outpoints = pick_watched(rng, txs, share=0.3)
    # a watched outpoint spent twice in the block can't happen, but the same script paid twice can
    scripts.add(txs[5].vout[0].script_pubkey.data)

    scan = scan_block(built.raw, scripts, outpoints, with_txids=True)

    want_outs, want_spends = expected(txs, scripts, outpoints)
    assert len(want_outs) > 10 and len(want_spends) > 10
    assert list(scan.outputs) == want_outs
    assert list(scan.spends) == want_spends
    assert scan.txids == tuple(tx.txid().hex() for tx in txs)
    assert scan.tx_count == 60
    assert scan.block_hash == hash256(built.header)[::-1].hex() == header_hash(built.header)
    assert scan.prev_block_hash == built.header[4:36][::-1].hex()
    assert scan.merkle_root == merkle_root(list(scan.txids))
    assert scan.timestamp == int.from_bytes(built.header[68:72], "little")


def test_per_transaction_results_group_the_flat_lists() -> None:
    built = build_block(seed=2, n_tx=40)
    txs = embit_parse(built.raw)
    scripts, outpoints = pick_watched(random.Random(3), txs, share=0.2)

    scan = scan_block(built.raw, scripts, outpoints)

    assert scan.txids is None  # not computed unless asked: hashing is the expensive part
    assert [o for t in scan.transactions for o in t.outputs] == list(scan.outputs)
    assert [s for t in scan.transactions for s in t.spends] == list(scan.spends)
    assert all(t.matched for t in scan.transactions)
    indexes = [t.index for t in scan.transactions]
    assert indexes == sorted(set(indexes))
    for t in scan.transactions:
        assert t.txid == txs[t.index].txid().hex()


def test_nothing_watched_finds_nothing_and_coinbase_is_not_a_spend() -> None:
    built = build_block(seed=4, n_tx=20)
    coinbase_outpoint = b"\x00" * 32 + b"\xff\xff\xff\xff"
    scan = scan_block(built.raw, frozenset(), {coinbase_outpoint})
    assert scan.outputs == ()
    # the coinbase "spends" the null outpoint; only watching it literally reports it
    assert [(s.vin, s.prev_txid, s.prev_vout) for s in scan.spends] == [(0, "00" * 32, 0xFFFFFFFF)]
    assert scan_block(built.raw, set(), set()).transactions == ()


def test_dict_watched_sets_are_accepted() -> None:
    """The watcher may keep script -> loan id; a dict is a Container of its keys."""
    built = build_block(seed=5, n_tx=15)
    txs = embit_parse(built.raw)
    target = txs[3].vout[0]
    scan = scan_block(built.raw, {target.script_pubkey.data: 42}, {})
    assert [(o.txid, o.vout, o.value) for o in scan.outputs] == [
        (txs[3].txid().hex(), 0, target.value)
    ]


def test_compact_size_slow_paths() -> None:
    """>= 253 transactions, outputs, witness items and script bytes use 3-byte compact sizes."""
    built = build_block(seed=6, n_tx=300, kinds=("big", "p2wpkh", "legacy"))
    assert built.raw[80] == 0xFD
    txs = embit_parse(built.raw)
    assert any(len(tx.vout) >= 253 for tx in txs)
    scripts, outpoints = pick_watched(random.Random(7), txs, share=0.05)
    scan = scan_block(built.raw, scripts, outpoints, with_txids=True)
    want_outs, want_spends = expected(txs, scripts, outpoints)
    assert list(scan.outputs) == want_outs
    assert list(scan.spends) == want_spends
    assert scan.txids == tuple(tx.txid().hex() for tx in txs)


def test_legacy_only_block_without_witnesses() -> None:
    rng = random.Random(8)
    keys = Keys(rng)
    txs = [make_coinbase(rng, keys, segwit=False)] + [
        make_tx(rng, keys, "legacy") for _ in range(9)
    ]
    raw = bytes(80) + compact.to_bytes(10) + b"".join(tx.serialize() for tx in txs)
    assert all(tx.serialize()[4] != 0 for tx in txs)  # really no segwit marker
    scan = scan_block(raw, set(), set(), with_txids=True)
    assert scan.txids == tuple(tx.txid().hex() for tx in txs)


@pytest.mark.parametrize("seed", range(25))
def test_random_blocks_agree_with_embit(seed: int) -> None:
    rng = random.Random(1000 + seed)
    built = build_block(seed=seed + 100, n_tx=rng.randrange(1, 40))
    txs = embit_parse(built.raw)
    scripts, outpoints = pick_watched(rng, txs, share=rng.random())
    scan = scan_block(bytearray(built.raw), scripts, outpoints, with_txids=True)
    want_outs, want_spends = expected(txs, scripts, outpoints)
    assert list(scan.outputs) == want_outs
    assert list(scan.spends) == want_spends
    assert scan.txids == tuple(tx.txid().hex() for tx in txs)
    assert scan.merkle_root == merkle_root(list(scan.txids))


def test_scan_transaction_matches_embit() -> None:
    rng = random.Random(9)
    keys = Keys(rng)
    for kind in ("legacy", "p2wpkh", "p2wsh", "big"):
        tx = make_tx(rng, keys, kind)
        raw = tx.serialize()
        scripts = {tx.vout[-1].script_pubkey.data}
        outpoints = {outpoint_key(tx.vin[0].txid.hex(), tx.vin[0].vout)}
        result = scan_transaction(raw, scripts, outpoints)
        want_outs, want_spends = expected([tx], scripts, outpoints)
        assert result == TxScan(tx.txid().hex(), 0, tuple(want_outs), tuple(want_spends))
        assert result.spends[0].outpoint in outpoints
        # no match: the txid is still there, mempool callers key on it
        empty = scan_transaction(memoryview(raw), set(), set())
        assert (empty.txid, empty.matched) == (tx.txid().hex(), False)


def test_outpoint_key_layout() -> None:
    txid = "ab" * 31 + "01"
    key = outpoint_key(txid, 0x01020304)
    assert key == bytes.fromhex(txid)[::-1] + b"\x04\x03\x02\x01"
    assert len(key) == 36
    with pytest.raises(ValueError):
        outpoint_key("ab", 0)
    with pytest.raises(ValueError):
        outpoint_key(txid, 2**32)


# --- malformed input ---------------------------------------------------------


@pytest.fixture(scope="module")
def small_block() -> Built:
    return build_block(seed=11, n_tx=6)


def test_every_truncation_is_rejected(small_block: Built) -> None:
    raw = small_block.raw
    for cut in range(len(raw)):
        with pytest.raises(MalformedBlock):
            scan_block(raw[:cut], set(), set())


def test_trailing_bytes_are_rejected(small_block: Built) -> None:
    with pytest.raises(MalformedBlock, match="trailing"):
        scan_block(small_block.raw + b"\x00", set(), set())


def _with_count(raw: bytes, count_bytes: bytes) -> bytes:
    """Replace the block's one-byte tx count."""
    return raw[:80] + count_bytes + raw[81:]


@pytest.mark.parametrize(
    ("count", "message"),
    [
        (b"\x00", "no transactions"),
        (b"\xff" + (2**40).to_bytes(8, "little"), "too large"),
        (b"\xfe" + (0x01000000).to_bytes(4, "little"), "cannot fit"),
        (b"\xfd\x05\x00", "non-canonical"),
        (b"\x07", "truncated"),
    ],
)
def test_impossible_tx_counts(small_block: Built, count: bytes, message: str) -> None:
    with pytest.raises(MalformedBlock, match=message):
        scan_block(_with_count(small_block.raw, count), set(), set())


def test_bad_segwit_flag_and_empty_io() -> None:
    rng = random.Random(12)
    tx = make_tx(rng, Keys(rng), "p2wpkh").serialize()
    assert tx[4:6] == b"\x00\x01"
    with pytest.raises(MalformedTransaction, match="segwit flag"):
        scan_transaction(tx[:5] + b"\x02" + tx[6:], set(), set())
    legacy = make_tx(rng, Keys(rng), "legacy")
    legacy.vout = []
    with pytest.raises(MalformedTransaction, match="no outputs"):
        scan_transaction(legacy.serialize(), set(), set())
    # 0xfd inputs claimed in a tx far too short to hold them
    raw = make_tx(rng, Keys(rng), "legacy").serialize()
    with pytest.raises(MalformedTransaction, match="cannot fit"):
        scan_transaction(raw[:4] + b"\xfd\x00\x01" + raw[5:], set(), set())


def test_malformed_errors_are_value_errors() -> None:
    assert issubclass(MalformedTransaction, MalformedBlock)
    assert issubclass(MalformedBlock, ValueError)
    with pytest.raises(MalformedBlock, match="80 bytes"):
        header_hash(bytes(79))
    with pytest.raises(MalformedBlock):
        scan_block(b"", set(), set())
    with pytest.raises(MalformedTransaction, match="truncated"):
        scan_transaction(
            make_tx(random.Random(1), Keys(random.Random(1)), "p2wsh").serialize()[:-1],
            set(),
            set(),
        )


def test_random_corruption_raises_only_malformed_block(small_block: Built) -> None:
    """Fuzz: garbage either parses to some result or raises MalformedBlock, nothing else."""
    rng = random.Random(13)
    raw = small_block.raw
    outcomes = {"ok": 0, "malformed": 0}
    for _ in range(3000):
        data = bytearray(raw)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(80, len(data))] = rng.randrange(256)
        try:
            scan = scan_block(bytes(data), set(), set())
        except MalformedBlock:
            outcomes["malformed"] += 1
        else:
            assert isinstance(scan, BlockScan)
            outcomes["ok"] += 1
    for _ in range(500):
        garbage = rng.randbytes(rng.randrange(0, 400))
        with pytest.raises(MalformedBlock):
            scan_block(garbage, set(), set())
    assert outcomes["ok"] > 0 and outcomes["malformed"] > 0


# -- ScriptIndex: the watcher's compact set of watched scripts ---------------------------


def random_p2wsh(rng: random.Random) -> bytes:
    return b"\x00\x20" + rng.randbytes(32)


def test_membership_is_exact_beyond_the_filter() -> None:
    """Members are found; non-members never are, though thousands of them pass the bit
    filter (32 bits per script at capacity: ~3% of random scripts)."""
    rng = random.Random(1)
    members = {random_p2wsh(rng) for _ in range(1_000)}
    index = ScriptIndex(members, capacity=1_000)
    assert len(index) == 1_000
    assert all(m in index for m in members)

    strangers = [random_p2wsh(rng) for _ in range(100_000)]
    passed_filter = sum(
        1
        for s in strangers
        if index._filter[(hash(s) >> 3) & index._filter_mask] & (1 << (hash(s) & 7))
    )
    assert passed_filter > 1_000, "the exact check behind the filter must be exercised"
    assert not any(s in index for s in strangers)
    # The same bytes with another length, truncated or extended, are other scripts.
    some = next(iter(members))
    assert some[:-1] not in index and some + b"\x00" not in index and some[1:] not in index
    assert "not bytes" not in index and 34 not in index


def test_scripts_of_several_lengths_and_duplicates() -> None:
    rng = random.Random(2)
    scripts = [
        b"\x00\x14" + rng.randbytes(20),  # P2WPKH
        b"\x51\x20" + rng.randbytes(32),  # P2TR
        b"\x00\x20" + rng.randbytes(32),  # P2WSH
        b"\xa9\x14" + rng.randbytes(20) + b"\x87",  # P2SH
        b"\x6a",  # a one-byte script
        rng.randbytes(300),  # longer than any standard script
    ]
    index = ScriptIndex()
    assert [index.add(s) for s in scripts] == [True] * len(scripts)
    assert [index.add(s) for s in scripts] == [False] * len(scripts)
    assert len(index) == len(scripts)
    assert index.lengths == {22, 34, 23, 1, 300}
    assert sorted(index) == sorted(scripts)
    with pytest.raises(ValueError, match="not empty"):
        index.add(b"")


def test_growth_past_capacity_keeps_every_script() -> None:
    rng = random.Random(3)
    index = ScriptIndex(capacity=10)  # rounded up to MIN_CAPACITY
    scripts = [random_p2wsh(rng) for _ in range(5 * ScriptIndex.MIN_CAPACITY + 7)]
    assert index.update(scripts) == len(scripts)
    assert len(index) == len(scripts)
    assert all(s in index for s in scripts)
    assert not any(random_p2wsh(rng) in index for _ in range(10_000))
    index.reserve(100_000)
    assert all(s in index for s in scripts) and len(index) == len(scripts)


@pytest.mark.parametrize("seed", range(6))
def test_a_scan_with_the_index_equals_a_scan_with_a_set(seed: int) -> None:
    built = build_block(seed=40 + seed, n_tx=50)
    txs = embit_parse(built.raw)
    scripts, outpoints = pick_watched(random.Random(seed), txs, share=0.25)
    index = ScriptIndex(scripts)

    scan = scan_block(built.raw, index, outpoints, with_txids=True)

    assert scan == scan_block(built.raw, scripts, outpoints, with_txids=True)
    want_outputs, _ = expected(txs, scripts, outpoints)
    assert list(scan.outputs) == want_outputs and want_outputs
    for tx in txs[1:4]:
        raw = tx.serialize()
        assert scan_transaction(raw, index, outpoints) == scan_transaction(raw, scripts, outpoints)


def test_the_index_is_a_third_of_a_set() -> None:
    """100,000 P2WSH scripts: their bytes are 3.4 MB; the index adds its slots (1 MB) and
    filter (0.5 MB) and nothing per script, where a set of them, as the watcher would
    read them from the database, takes ~12 MB."""
    rng = random.Random(4)
    scripts = [random_p2wsh(rng) for _ in range(100_000)]
    tracemalloc.start()
    try:
        index = ScriptIndex(scripts, capacity=len(scripts))
        index_bytes, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        as_set = {bytes.fromhex(s.hex()) for s in scripts}  # new objects, as from rows
        set_bytes = tracemalloc.get_traced_memory()[0] - index_bytes
    finally:
        tracemalloc.stop()
    assert len(index) == len(as_set) == 100_000
    assert index_bytes < 5_500_000, index_bytes
    assert index_bytes * 2 < set_bytes, (index_bytes, set_bytes)
