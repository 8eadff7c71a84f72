"""`/v1/metrics`: the health figures in Prometheus' text format, parsed by Prometheus' own
parser (the figures with a watcher and a node are checked in tests/watcher/test_stalls.py)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine
from support.world import build_world


def test_metrics_before_any_watcher_and_without_a_node(engine: Engine) -> None:
    answer = build_world(engine).call(None, "GET", "/v1/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }
    assert samples == {"custody_node_reachable": 0}  # nothing about a watcher never run
