"""The reports benchmark (`python -m bench reports`) on a small book, so the tool keeps
working as the reports change (no timed assertion: the figures are the bench's)."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from bench import reports


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the bench's own backend
def test_the_reports_bench_measures_each_file(engine: Engine) -> None:
    took = reports.measure_on(engine, rows=20, loans=4)  # asserts the register has every row
    assert set(took) == {"register", "csv", "xlsx", "statement"}
    assert all(seconds > 0 for seconds in took.values())
