"""Memory of the real watcher holding 1,000,000 watched collateral scripts.

Builds a SQLite database with one million handed-out addresses, then, in a fresh
interpreter, lets a `Watcher` load them exactly as it does at start-up and reports
the process's peak RSS (VmHWM), which must stay at or under 150 MB (issue 11).

Measured: with the scripts in a dict (script -> address id) the index took 170 MB and
the process peaked at 250-254 MB; with `ScriptIndex` (scripts back to back, a table of
positions, a bit filter) the index takes ~55 MB and the peak is ~138 MB, of which ~77 MB
is the interpreter with the service imported."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import Figure
from bench.block_scan import _status_kb

COUNT = 1_000_000
TARGET_MB = 150.0


def build_database(path: Path, count: int) -> None:
    from datetime import UTC, datetime, timedelta

    from custody.db.migrate import upgrade
    from custody.db.models import Loan, LoanState, Party, PartyKind, Principal, Role
    from custody.db.session import make_engine, transaction

    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    with transaction(engine) as session:
        parties = [Party(name=k.value, kind=k) for k in PartyKind]
        session.add_all(parties)
        session.flush()
        who = Principal(name="bench", role=Role.admin, key_hash="0" * 64, key_prefix="pc_")
        session.add(who)
        session.flush()
        session.add(
            Loan(
                state=LoanState.awaiting_deposit,
                miner_party_id=parties[0].id or 0,
                bank_party_id=parties[1].id or 0,
                arbiter_party_id=parties[2].id or 0,
                principal_kopecks=1,
                interest_rate_bps=0,
                maturity_at=datetime.now(UTC) + timedelta(days=1),
                required_collateral_sats=1,
                margin_call_ltv_bps=7500,
                liquidation_ltv_bps=9000,
                cure_window_hours=48,
                miner_return_address="-",
                bank_liquidation_address="--",
                created_by=who.id or 0,
            )
        )
    engine.dispose()
    now = datetime.now(UTC).isoformat()
    conn = sqlite3.connect(path)
    conn.executemany(
        'INSERT INTO collateraladdress (loan_id, change, "index", address, script_pubkey_hex,'
        " created_at) VALUES (1, 0, ?, ?, ?, ?)",
        (
            (
                i,
                f"bench-address-{i}",
                "0020" + hashlib.sha256(i.to_bytes(8, "big")).hexdigest(),
                now,
            )
            for i in range(count)
        ),
    )
    conn.commit()
    conn.close()


def probe(path: str) -> None:
    """Fresh interpreter: import everything, then let a Watcher load the scripts."""
    from custody.chain.rpc import NodeRpc
    from custody.db.session import make_engine
    from custody.watcher.service import Watcher

    engine = make_engine(f"sqlite:///{path}")
    watcher = Watcher(engine, NodeRpc("http://127.0.0.1:9", "unused", "unused"))
    before = _status_kb()
    started = time.perf_counter()
    watcher._load_new_addresses()
    seconds = time.perf_counter() - started
    after = _status_kb()
    print(
        json.dumps(
            {
                "before": before,
                "after": after,
                "count": len(watcher._watched.scripts),
                "seconds": seconds,
            }
        )
    )


def run(count: int = COUNT) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="bench-watcher-mem-") as tmp:
        db = Path(tmp) / "custody.db"
        started = time.perf_counter()
        build_database(db, count)
        print(
            f"watcher_memory: {count:,} addresses written in {time.perf_counter() - started:.0f} s"
        )
        out = subprocess.run(
            [sys.executable, "-c", f"from bench.watcher_memory import probe; probe({str(db)!r})"],
            cwd=Path(__file__).resolve().parents[1],
            check=True,
            capture_output=True,
            text=True,
        )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    hwm_mb = result["after"]["VmHWM"] / 1024
    index_mb = (result["after"]["VmRSS"] - result["before"]["VmRSS"]) / 1024
    print(
        f"watcher_memory: watcher loaded {result['count']:,} scripts in "
        f"{result['seconds']:.1f} s; index {index_mb:.0f} MB, process peak {hwm_mb:.0f} MB"
    )
    return [
        Figure(
            "watcher_memory.scripts_loaded",
            float(result["count"]),
            "scripts",
            f"== {count:,}",
            result["count"] == count,
        ),
        Figure("watcher_memory.index_mb", index_mb, "MB", "info", True),
        Figure(
            "watcher_memory.peak_rss_mb", hwm_mb, "MB", f"<= {TARGET_MB:g}", hwm_mb <= TARGET_MB
        ),
    ]


if __name__ == "__main__":
    for figure in run():
        print(figure.line())
