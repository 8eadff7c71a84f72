"""The bank seed's backup: SLIP-39 shares for named officers, and the restore from them.

Why SLIP-39 (through `shamir-mnemonic`, the reference implementation): M of N officers
together restore the seed and fewer learn nothing of it, each share is words a person can
write down and check (RS1024 checksum), and Trezor devices can hold or verify shares.

One group, `threshold` of `len(officers)` members. No SLIP-39 passphrase: the shares alone
restore the seed, so the officers must keep them apart (a passphrase someone forgets would
lose the key, which is what the backup is against). Each share goes to its own file,
created exclusively with mode 0600 in a folder the ceremony names (removable media, then
paper); the shares are never stored, logged or printed by the signer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import shamir_mnemonic

from hsm.registry import Registry
from hsm.seed import BankSeed
from hsm.signer import PolicyViolation

__all__ = [
    "make_share_set",
    "read_share_file",
    "recover_seed",
    "split_seed",
    "write_share_files",
]

MAX_OFFICERS: Final = 16  # SLIP-39's member count limit
_OFFICER_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,39}")
SHARE_SUFFIX: Final = ".slip39.txt"


def _refuse(check: str, reason: str) -> PolicyViolation:
    return PolicyViolation(check, reason, field="shares")


def split_seed(seed: bytes | bytearray, threshold: int, officers: Sequence[str]) -> dict[str, str]:
    """One SLIP-39 share (a mnemonic) per officer; `threshold` of them restore the seed."""
    names = list(officers)
    if len(set(names)) != len(names):
        raise _refuse("backup_officers", "each officer holds one share: a name is repeated")
    bad = [n for n in names if not _OFFICER_RE.fullmatch(n)]
    if bad:
        raise _refuse(
            "backup_officers",
            f"officer names are 1-40 letters, digits, '.', '_' or '-', starting with a "
            f"letter: {bad[0]!r} is not",
        )
    if not 2 <= len(names) <= MAX_OFFICERS:
        raise _refuse("backup_officers", f"name 2 to {MAX_OFFICERS} officers")
    if not 2 <= threshold <= len(names):
        raise _refuse(
            "backup_threshold",
            f"the threshold must be at least 2 (one officer alone must not restore the bank's "
            f"key) and at most the {len(names)} officers",
        )
    (shares,) = shamir_mnemonic.generate_mnemonics(
        1, [(threshold, len(names))], bytes(seed), extendable=True, iteration_exponent=1
    )
    return dict(zip(names, shares, strict=True))


def recover_seed(mnemonics: Sequence[str]) -> bytearray:
    """The seed from enough shares of one set (more than enough is fine: every share must
    still be a valid share of the same set); too few, mixed sets or a mistyped word are
    refused with SLIP-39's own reason."""
    from shamir_mnemonic.share import Share

    try:
        shares = [Share.from_mnemonic(m) for m in mnemonics]
        if not shares:
            raise shamir_mnemonic.MnemonicError("no shares were given")
        groups = {s.group_parameters() for s in shares}
        if len(groups) != 1:
            raise shamir_mnemonic.MnemonicError("the shares come from different share sets")
        if len({s.index for s in shares}) != len(shares):
            raise shamir_mnemonic.MnemonicError("a share was given twice")
        need = next(iter(groups)).member_threshold
        chosen = list(mnemonics)[:need] if len(shares) > need else list(mnemonics)
        return bytearray(shamir_mnemonic.combine_mnemonics(chosen))
    except shamir_mnemonic.MnemonicError as exc:
        raise _refuse("backup_shares", f"the shares do not restore a seed: {exc}") from None


def write_share_files(
    folder: Path, shares: Mapping[str, str], *, fingerprint: str, threshold: int
) -> list[Path]:
    """Each officer's share in `folder/<officer>.slip39.txt` (0600, never overwritten)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = [folder / f"{officer}{SHARE_SUFFIX}" for officer in shares]
    existing = [p for p in paths if p.exists()]
    if existing:
        raise _refuse("backup_files", f"{existing[0]} exists: not overwriting a share")
    for path, (officer, mnemonic) in zip(paths, shares.items(), strict=True):
        text = (
            f"# SLIP-39 share of the bank seed {fingerprint} for {officer}\n"
            f"# {threshold} of {len(shares)} shares restore it: `hsm seed restore FILE...`\n"
            "# Copy it to paper or steel, keep it away from the other shares, delete this file.\n"
            f"{mnemonic}\n"
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    return paths


def read_share_file(path: Path) -> str:
    """The mnemonic of a share file (its one line that is not a `#` comment)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise _refuse("backup_files", f"cannot read {path}: {exc.strerror}") from None
    words = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if len(words) != 1:
        raise _refuse("backup_files", f"{path} does not hold exactly one share")
    return " ".join(words[0].split())


def make_share_set(
    seed: BankSeed,
    registry: Registry,
    officers: Sequence[str],
    threshold: int,
    folder: Path,
    now: datetime | None = None,
) -> list[Path]:
    """Split the signer's seed into a share file per officer and record the set (names,
    threshold; never a share). HD bank keys are made only once a set is on record."""
    fingerprint = seed.fingerprint
    if fingerprint is None:
        raise _refuse("seed_missing", "the signer has no bank seed to back up")
    shares = seed.with_seed(lambda secret: split_seed(secret, threshold, officers))
    paths = write_share_files(folder, shares, fingerprint=fingerprint, threshold=threshold)
    registry.record_backup(fingerprint, threshold, officers, now or datetime.now(UTC))
    return paths
