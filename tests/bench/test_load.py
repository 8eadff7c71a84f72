"""The load benchmark (`python -m bench load`) at a trivial rate against a real
`custody serve` on SQLite, so the tool keeps working as the API changes."""

from __future__ import annotations

import pytest

from bench import load

pytestmark = [pytest.mark.process]  # starts custody/hsm commands as OS processes


def test_the_load_bench_reports_each_rate_with_its_counts() -> None:
    rates, duration = (4, 8), 1.0
    report = load.measure_backend("sqlite", rates, duration, loans=4, miners=2)

    assert [row.rate for row in report.rows] == list(rates)
    for row in report.rows:
        assert row.sent == round(row.rate * duration)
        assert row.sent == row.ok + sum(row.errors.values())
        # A trivial load: every request of the mix answered as expected (the warm-up has
        # already sent each kind once and checked its status).
        assert row.errors == {}, row.errors
        assert 0 < row.p50_ms <= row.p99_ms <= row.max_ms
        # Latency runs from the due time, so a client that started late (a busy machine)
        # may report more than its timeout; what it waited once it sent is under it.
        assert all(o.latency - o.lag < report.client.timeout for o in row.outcomes), row
    # Each new address answered 201 is a row in the database (nothing timed out).
    assert report.addresses_made == report.new_addresses_ok()

    table = report.table().splitlines()
    rows = [line.split() for line in table if line.split()[1:2] in (["4"], ["8"])]
    assert [(int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows] == [
        (row.rate, row.sent, row.ok, 0) for row in report.rows
    ]
    verdict = report.verdict()
    assert verdict[0].startswith("load[sqlite]: highest rate with p99 <= 50 ms and no errors: ")
    assert verdict[1] == "load[sqlite]: target 200 rps: not measured (not in --rates)"
    assert [f.name for f in report.figures()] == ["load.sqlite.highest_rate_held"]
