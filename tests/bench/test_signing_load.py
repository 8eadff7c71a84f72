"""The signing-load benchmark (`python -m bench signing_load`) at a trivial size against a
real `custody serve` and btcd, so the tool keeps working as the signing API changes."""

from __future__ import annotations

import pytest

from bench import signing_load

pytestmark = [pytest.mark.process, pytest.mark.node]  # custody serve, its own btcd


def test_the_signing_load_bench_releases_every_loan_without_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    figures = {f.name: f for f in signing_load.run(3, workers=1)}

    errors = figures["signing_load.errors"]
    assert errors.value == 0
    assert not errors.passed  # 3 loans at once is not the 100 the target asks for
    for phase in ("create", "approve_miner", "bank_broadcast"):
        p50, p99 = figures[f"signing_load.{phase}.p50_ms"], figures[f"signing_load.{phase}.p99_ms"]
        assert 0 < p50.value <= p99.value < 1e3 * signing_load.TIMEOUT
    out = capsys.readouterr().out
    assert "3 requests broadcast, 3 loans releasing, 3 of the 3 transactions" in out
    assert "audit chain verifies" in out
    phases = [line.split() for line in out.splitlines() if " at once: " in line]
    assert [(p[1], p[2], p[5], p[8]) for p in phases] == [
        ("create", "3", "3", "none;"),
        ("approve+miner", "6", "6", "none;"),
        ("bank+broadcast", "3", "3", "none;"),
    ]
