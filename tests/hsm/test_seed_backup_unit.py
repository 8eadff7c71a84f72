"""The bank seed's share sets and the registry's upgrade, without a token: SLIP-39 splits
that restore only from enough shares of one set, officers' files that are private and never
overwritten, and a version-2 registry (fixed keys only) upgraded in place."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from hsm.backup import read_share_file, recover_seed, split_seed, write_share_files
from hsm.registry import SCHEMA_VERSION, Registry
from hsm.signer import PolicyViolation

pytestmark = pytest.mark.unit

OFFICERS = ["irina", "pavel", "sofia", "kirill", "marta"]


def test_three_of_five_restore_and_two_do_not() -> None:
    seed = os.urandom(32)
    shares = split_seed(seed, 3, OFFICERS)
    assert list(shares) == OFFICERS and len(set(shares.values())) == 5
    words = list(shares.values())
    assert bytes(recover_seed([words[4], words[1], words[2]])) == seed
    assert bytes(recover_seed(words)) == seed  # all five: more than enough
    with pytest.raises(PolicyViolation):
        recover_seed([words[0], words[0], words[1]])  # one share twice is not two
    with pytest.raises(PolicyViolation) as too_few:
        recover_seed(words[:2])
    assert too_few.value.check == "backup_shares"
    other = list(split_seed(os.urandom(32), 3, OFFICERS).values())
    with pytest.raises(PolicyViolation):
        recover_seed([words[0], words[1], other[2]])  # two sets mixed
    typo = words[0].split()
    typo[5] = "academic" if typo[5] != "academic" else "acid"
    with pytest.raises(PolicyViolation):
        recover_seed([" ".join(typo), words[1], words[2]])  # RS1024 checksum


@pytest.mark.parametrize(
    ("threshold", "officers", "check"),
    [
        (1, OFFICERS, "backup_threshold"),  # one officer alone must not restore the key
        (6, OFFICERS, "backup_threshold"),
        (2, ["irina", "irina", "pavel"], "backup_officers"),
        (2, ["irina"], "backup_officers"),
        (2, ["irina", "../etc/passwd"], "backup_officers"),
        (2, ["irina", ""], "backup_officers"),
    ],
)
def test_bad_share_sets_are_refused(threshold: int, officers: list[str], check: str) -> None:
    with pytest.raises(PolicyViolation) as refused:
        split_seed(os.urandom(32), threshold, officers)
    assert refused.value.check == check


def test_share_files_are_private_and_never_overwritten(tmp_path: Path) -> None:
    seed = os.urandom(32)
    shares = split_seed(seed, 2, OFFICERS[:3])
    paths = write_share_files(tmp_path / "out", shares, fingerprint="0badc0de", threshold=2)
    assert [p.name for p in paths] == [f"{o}.slip39.txt" for o in OFFICERS[:3]]
    for path, officer in zip(paths, OFFICERS, strict=False):
        assert path.stat().st_mode & 0o777 == 0o600
        assert read_share_file(path) == shares[officer]
        assert "0badc0de" in path.read_text() and officer in path.read_text()
    assert bytes(recover_seed([read_share_file(p) for p in paths[1:]])) == seed
    before = paths[0].read_bytes()
    with pytest.raises(PolicyViolation) as again:
        write_share_files(tmp_path / "out", shares, fingerprint="0badc0de", threshold=2)
    assert again.value.check == "backup_files"
    assert paths[0].read_bytes() == before


_V2_LOAN = """
CREATE TABLE loan (
    loan_ref TEXT PRIMARY KEY, network TEXT NOT NULL, key_ref TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL UNIQUE, descriptor TEXT NOT NULL UNIQUE, terms TEXT NOT NULL,
    miner_return_address TEXT NOT NULL, bank_liquidation_address TEXT NOT NULL,
    registered_by TEXT NOT NULL, created_at TEXT NOT NULL,
    highest_index INTEGER NOT NULL DEFAULT 0 CHECK (highest_index >= 0),
    call_seen_at TEXT NULL, last_valued_at TEXT NULL
);
"""


def test_a_version_2_registry_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "hsm-state.db"
    db = sqlite3.connect(path)
    db.executescript(_V2_LOAN)
    terms = (
        '{"principal_kopecks": 1, "interest_rate_bps": 0, '
        '"start_at": "2026-01-01T00:00:00.000000Z", '
        '"maturity_at": "2027-01-01T00:00:00.000000Z", "margin_call_ltv_bps": 7500, '
        '"liquidation_ltv_bps": 9000, "cure_window_hours": 48, "required_confirmations": 1, '
        '"target_ltv_bps": 6000}'
    )
    db.execute(
        "INSERT INTO loan VALUES ('loan-1', 'regtest', 'pledge-loan:loan-1', '02aa', 'wsh(x)', "
        "?, 'a', 'b', '[]', '2026-01-01T00:00:00.000000Z', 4, NULL, NULL)",
        (terms,),
    )
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    registry = Registry(path)
    try:
        loan = registry.loan("loan-1")
        assert loan is not None
        assert (loan.bank_key_kind, loan.bank_account, loan.highest_index) == ("fixed", None, 4)
        assert registry.next_bank_account() == 0
        assert registry.seed() is None and registry.backups() == []
        version = registry.read_one("PRAGMA user_version", ())
        assert version is not None and version[0] == SCHEMA_VERSION == 4  # v2 -> v3 -> v4
    finally:
        registry.close()
    Registry(path).close()  # opens again at version 4 without upgrading twice
