"""Benchmark: raw block scan for the deposit watcher vs a plain embit parse-and-match.

Targets (from the watcher's budget): on a mainnet-sized block (~4,000 txs,
1.5-2 MB) our scan, against the watcher's own `ScriptIndex` of 1,000,000 scripts,
must be no slower than embit and under 30 ms median, and a process holding the index
must stay under 150 MB RSS. The scan against a plain set of the same scripts, and
that set's memory, are reported beside it.

Everything is built from a fixed seed so two runs measure the same bytes.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path

from embit import compact
from embit.script import Script, Witness
from embit.transaction import Transaction, TransactionInput, TransactionOutput

from bench import Figure
from custody.chain.blocks import ScriptIndex, outpoint_key, scan_block

SEED = 20240601
TX_COUNT = 4_000
WATCHED_SCRIPT_COUNT = 1_000_000
PAID_WATCHED = 100
SPENT_WATCHED = 5
OTHER_WATCHED_OUTPOINTS = 10_000
RUNS_OURS = 101
RUNS_EMBIT = 31
TARGET_MEDIAN_MS = 30.0
TARGET_RSS_MB = 150.0

# A match as both implementations report it, so the two can be compared exactly.
Match = tuple[str, str, int, int | bytes, int | str]


def _hash256(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def watched_scripts(seed: int = SEED, count: int = WATCHED_SCRIPT_COUNT) -> set[bytes]:
    """The watched collateral scripts: P2WSH-like `0020 + 32 bytes`."""
    rng = random.Random(seed)
    return {b"\x00\x20" + rng.randbytes(32) for _ in range(count)}


def _sig(rng: random.Random) -> bytes:
    return b"\x30" + rng.randbytes(rng.choice((69, 70, 70, 70))) + b"\x01"


def _pubkey(rng: random.Random) -> bytes:
    return rng.choice((b"\x02", b"\x03")) + rng.randbytes(32)


def _output_script(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.45:
        return b"\x00\x14" + rng.randbytes(20)  # P2WPKH
    if kind < 0.65:
        return b"\x51\x20" + rng.randbytes(32)  # P2TR
    if kind < 0.80:
        return b"\x00\x20" + rng.randbytes(32)  # P2WSH (not watched)
    if kind < 0.92:
        return b"\xa9\x14" + rng.randbytes(20) + b"\x87"  # P2SH
    return b"\x76\xa9\x14" + rng.randbytes(20) + b"\x88\xac"  # P2PKH


def _input(rng: random.Random, kind: str) -> TransactionInput:
    prev = TransactionInput(rng.randbytes(32), rng.randrange(0, 4), sequence=0xFFFFFFFD)
    if kind == "p2wpkh":
        prev.witness = Witness([_sig(rng), _pubkey(rng)])
    elif kind == "p2wsh":
        wscript = b"\x52" + b"".join(b"\x21" + _pubkey(rng) for _ in range(3)) + b"\x53\xae"
        prev.witness = Witness([b"", _sig(rng), _sig(rng), wscript])
    elif kind == "p2tr":
        prev.witness = Witness([rng.randbytes(64)])
    else:  # legacy P2PKH
        sig, pub = _sig(rng), _pubkey(rng)
        prev.script_sig = Script(bytes([len(sig)]) + sig + bytes([len(pub)]) + pub)
    return prev


def _tx(rng: random.Random) -> Transaction:
    """One transaction from a rough mainnet mix: mostly segwit, some legacy and batches."""
    roll = rng.random()
    if roll < 0.50:
        kinds, n_out = ["p2wpkh"] * rng.choice((1, 1, 2, 2, 3)), rng.choice((1, 2, 2, 2))
    elif roll < 0.62:
        kinds, n_out = ["p2wsh"] * rng.choice((1, 1, 2, 3)), 2
    elif roll < 0.77:
        kinds, n_out = ["p2tr"] * rng.choice((1, 1, 2)), rng.choice((1, 2))
    elif roll < 0.87:
        kinds, n_out = ["legacy"] * rng.choice((1, 2, 3)), 2
    elif roll < 0.90:
        kinds, n_out = ["legacy", "p2wpkh"], 2  # mixed: legacy input gets an empty witness
    elif roll < 0.95:
        kinds, n_out = ["p2wpkh"] * rng.choice((1, 2)), rng.randrange(10, 40)  # batch payout
    else:
        kinds, n_out = ["p2wpkh"], 2
    vout = [
        TransactionOutput(rng.randrange(546, 10**9), Script(_output_script(rng)))
        for _ in range(n_out)
    ]
    if roll >= 0.95:  # OP_RETURN with a zero-value output
        vout.append(TransactionOutput(0, Script(b"\x6a\x14" + rng.randbytes(20))))
    return Transaction(version=2, vin=[_input(rng, k) for k in kinds], vout=vout, locktime=0)


def _coinbase(rng: random.Random, height: int) -> Transaction:
    script_sig = Script(b"\x03" + height.to_bytes(3, "little") + rng.randbytes(8))
    vin = [TransactionInput(b"\x00" * 32, 0xFFFFFFFF, script_sig, witness=Witness([b"\x00" * 32]))]
    vout = [
        TransactionOutput(312_500_000, Script(b"\x00\x14" + rng.randbytes(20))),
        TransactionOutput(0, Script(b"\x6a\x24\xaa\x21\xa9\xed" + rng.randbytes(32))),
    ]
    return Transaction(version=2, vin=vin, vout=vout, locktime=0)


def _merkle_root(txids_le: list[bytes]) -> bytes:
    level = txids_le
    while len(level) > 1:
        if len(level) % 2:
            level = [*level, level[-1]]
        level = [_hash256(level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


@dataclass(frozen=True)
class BenchBlock:
    raw: bytes
    tx_count: int
    scripts: set[bytes]
    outpoints: set[bytes]


def build_block(scripts: set[bytes], seed: int = SEED, tx_count: int = TX_COUNT) -> BenchBlock:
    """A deterministic mainnet-sized block paying ~100 watched scripts and spending a few
    watched outpoints; returns it with the watched outpoint set."""
    rng = random.Random(seed + 1)
    txs = [_coinbase(rng, 840_000)] + [_tx(rng) for _ in range(tx_count - 1)]
    # Pay watched scripts: pick outputs (never the coinbase) and point them at watched scripts.
    chosen_scripts = rng.sample(sorted(scripts)[:50_000], PAID_WATCHED)
    for script in chosen_scripts:
        tx = txs[rng.randrange(1, len(txs))]
        tx.vout[rng.randrange(len(tx.vout))].script_pubkey = Script(script)
    # Spend watched outpoints: their (txid, vout) become the watched outpoint set.
    outpoints = {
        rng.randbytes(32) + rng.randrange(4).to_bytes(4, "little")
        for _ in range(OTHER_WATCHED_OUTPOINTS)
    }
    for _ in range(SPENT_WATCHED):
        inp = rng.choice(txs[rng.randrange(1, len(txs))].vin)
        outpoints.add(outpoint_key(inp.txid.hex(), inp.vout))
    txids_le = [tx.txid()[::-1] for tx in txs]
    header = (
        (0x20000000).to_bytes(4, "little")
        + rng.randbytes(32)
        + _merkle_root(txids_le)
        + (1_713_571_767).to_bytes(4, "little")
        + (0x17034219).to_bytes(4, "little")
        + rng.randbytes(4)
    )
    raw = header + compact.to_bytes(len(txs)) + b"".join(tx.serialize() for tx in txs)
    return BenchBlock(raw=raw, tx_count=len(txs), scripts=scripts, outpoints=outpoints)


def ours(raw: bytes, scripts: Container[bytes], outpoints: Container[bytes]) -> list[Match]:
    scan = scan_block(raw, scripts, outpoints)
    found: list[Match] = [("out", o.txid, o.vout, o.script_pubkey, o.value) for o in scan.outputs]
    found += [("spend", s.txid, s.vin, s.prev_vout, s.prev_txid) for s in scan.spends]
    return found


def embit_parse_and_match(
    raw: bytes, scripts: Container[bytes], outpoints: Container[bytes]
) -> list[Match]:
    """The baseline: parse every transaction with embit, look every output script and
    every input outpoint up in the same sets, hash only the matched transactions."""
    stream = io.BytesIO(raw)
    stream.seek(80)
    outs: list[Match] = []
    spends: list[Match] = []
    for _ in range(compact.read_from(stream)):
        tx = Transaction.read_from(stream)
        txid: str | None = None
        for vout, out in enumerate(tx.vout):
            if out.script_pubkey.data in scripts:
                txid = txid or tx.txid().hex()
                outs.append(("out", txid, vout, out.script_pubkey.data, out.value))
        for vin, inp in enumerate(tx.vin):
            if inp.txid[::-1] + inp.vout.to_bytes(4, "little") in outpoints:
                txid = txid or tx.txid().hex()
                spends.append(("spend", txid, vin, inp.vout, inp.txid.hex()))
    return outs + spends


def _timings_ms(fn: Callable[[], object], runs: int) -> list[float]:
    fn()  # warm up caches and imports
    gc.collect()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def _p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10, method="inclusive")[8]


def _status_kb() -> dict[str, int]:
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def memory_probe(kind: str) -> None:
    """Run in a fresh subprocess: print RSS/HWM (kB) before and after building the
    watched scripts as `kind` ("index": the watcher's ScriptIndex, "set": a plain set)."""
    before = _status_kb()
    if kind == "index":
        rng = random.Random(SEED)
        scripts: object = ScriptIndex(
            (b"\x00\x20" + rng.randbytes(32) for _ in range(WATCHED_SCRIPT_COUNT)),
            capacity=WATCHED_SCRIPT_COUNT,
        )
    else:
        scripts = watched_scripts()
    after = _status_kb()
    assert isinstance(scripts, ScriptIndex | set)
    print(json.dumps({"before": before, "after": after, "count": len(scripts)}))


@dataclass(frozen=True)
class MemoryFigures:
    count: int
    rss_mb: float
    hwm_mb: float
    set_mb: float


def _measure_memory(kind: str) -> MemoryFigures:
    """Measure in a fresh interpreter so nothing else this process allocated counts."""
    code = f"from bench.block_scan import memory_probe; memory_probe({kind!r})"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        check=True,
        capture_output=True,
        text=True,
    )
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    before, after = probe["before"], probe["after"]
    return MemoryFigures(
        count=int(probe["count"]),
        rss_mb=after["VmRSS"] / 1024,
        hwm_mb=after["VmHWM"] / 1024,
        set_mb=(after["VmRSS"] - before["VmRSS"]) / 1024,
    )


def run() -> list[Figure]:
    """Build the block, time both scanners, check they agree, measure memory."""
    print("block_scan: building 1,000,000 watched scripts and a mainnet-sized block ...")
    block = build_block(watched_scripts())
    raw, scripts, outpoints = block.raw, block.scripts, block.outpoints
    index = ScriptIndex(scripts, capacity=len(scripts))
    print(
        f"block_scan: block {len(raw) / 1e6:.2f} MB, {block.tx_count} txs, "
        f"{len(scripts):,} watched scripts, {len(outpoints):,} watched outpoints"
    )

    mine = ours(raw, index, outpoints)
    theirs = embit_parse_and_match(raw, scripts, outpoints)
    n_out = sum(1 for m in mine if m[0] == "out")
    n_spend = len(mine) - n_out
    agree = (
        sorted(mine, key=repr)
        == sorted(theirs, key=repr)
        == sorted(ours(raw, scripts, outpoints), key=repr)
        and n_out >= PAID_WATCHED * 0.9
        and n_spend >= SPENT_WATCHED
    )
    print(
        f"block_scan: matches ours={n_out} outputs/{n_spend} spends, embit={len(theirs)} total, "
        f"{'same' if agree else 'DIFFERENT'}"
    )

    ours_ms = _timings_ms(lambda: scan_block(raw, index, outpoints), RUNS_OURS)
    set_ms = _timings_ms(lambda: scan_block(raw, scripts, outpoints), RUNS_OURS)
    embit_ms = _timings_ms(lambda: embit_parse_and_match(raw, scripts, outpoints), RUNS_EMBIT)
    ours_med, embit_med = statistics.median(ours_ms), statistics.median(embit_ms)
    for label, samples in (("ours ", ours_ms), ("set  ", set_ms), ("embit", embit_ms)):
        print(
            f"block_scan: {label} median {statistics.median(samples):8.2f} ms"
            f"  p90 {_p90(samples):8.2f} ms  ({len(samples)} runs)"
        )
    print(f"block_scan: embit/ours = {embit_med / ours_med:.1f}x")

    mem = _measure_memory("index")
    as_set = _measure_memory("set")
    print(
        f"block_scan: {mem.count:,} watched scripts in the ScriptIndex: process RSS "
        f"{mem.rss_mb:.1f} MB (peak {mem.hwm_mb:.1f} MB, the index itself {mem.set_mb:.1f} MB); "
        f"as a set: peak {as_set.hwm_mb:.1f} MB, the set itself {as_set.set_mb:.1f} MB"
    )
    hwm_mb = mem.hwm_mb

    return [
        Figure("block_scan.matches_agree", float(agree), "bool", "ours == embit", agree),
        Figure(
            "block_scan.ours_median_ms",
            ours_med,
            "ms",
            f"< {TARGET_MEDIAN_MS:g} and <= embit",
            ours_med < TARGET_MEDIAN_MS and ours_med <= embit_med,
        ),
        Figure("block_scan.ours_p90_ms", _p90(ours_ms), "ms", "info", True),
        Figure("block_scan.set_median_ms", statistics.median(set_ms), "ms", "info", True),
        Figure("block_scan.embit_median_ms", embit_med, "ms", "info", True),
        Figure("block_scan.embit_p90_ms", _p90(embit_ms), "ms", "info", True),
        Figure(
            "block_scan.speedup_vs_embit", embit_med / ours_med, "x", ">= 1", embit_med >= ours_med
        ),
        Figure(
            "block_scan.watched_1m_rss_mb",
            hwm_mb,
            "MB",
            f"< {TARGET_RSS_MB:g} (peak RSS)",
            hwm_mb < TARGET_RSS_MB,
        ),
        Figure("block_scan.watched_1m_index_mb", mem.set_mb, "MB", "info", True),
        Figure("block_scan.watched_1m_set_mb", as_set.set_mb, "MB", "info", True),
    ]
