"""The signer's kept scan scripts (hsm.registry): read back by descriptor text and index
range, never another descriptor's, and a script once kept is not replaced."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsm.registry import Registry

pytestmark = pytest.mark.unit


def test_kept_scripts_come_back_by_descriptor_and_range_and_are_not_replaced(
    tmp_path: Path,
) -> None:
    registry = Registry(tmp_path / "state.db")
    try:
        ours = {(i, c): bytes([i, int(c)]) * 17 for i in range(4) for c in (False, True)}
        registry.keep_scan_scripts("wsh(ours)", ours)
        registry.keep_scan_scripts("wsh(theirs)", {(0, False): b"\xff" * 34})
        assert registry.scan_scripts("wsh(ours)", 0, 3) == ours
        assert registry.scan_scripts("wsh(ours)", 1, 2) == {
            at: s for at, s in ours.items() if 1 <= at[0] <= 2
        }
        assert registry.scan_scripts("wsh(nobody)", 0, 3) == {}
        registry.keep_scan_scripts("wsh(ours)", {(0, False): b"\x00" * 34})  # ignored
        assert registry.scan_scripts("wsh(ours)", 0, 0)[(0, False)] == ours[(0, False)]
    finally:
        registry.close()
    reopened = Registry(tmp_path / "state.db")  # kept across a restart
    try:
        assert reopened.scan_scripts("wsh(theirs)", 0, 0) == {(0, False): b"\xff" * 34}
    finally:
        reopened.close()
