"""`custody serve`'s /v1/metrics as a process: the request histogram moves for the route
template and status a request had, and with two uvicorn workers a scrape (answered by
either) counts the requests of both (prometheus_client's multiprocess mode). Its log is
one JSON object per line, uvicorn's own lines included."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine
from support.custody_serve import ServiceProcess, custody_serve, ready_lender

pytestmark = [pytest.mark.process]  # starts custody/hsm commands as OS processes

COUNT = "custody_http_request_duration_seconds_count"
TEMPLATE = "/v1/loans/{loan_id}"


def _count(server: ServiceProcess, **labels: str) -> float:
    """The histogram's count for these labels, scraped now (a new connection: any worker)."""
    answer = httpx.get(f"{server.url}/v1/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    return sum(
        sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
        if sample.name == COUNT and all(sample.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_the_histogram_counts_every_request_of_every_worker(
    db_url: str, engine: Engine, tmp_path: Path, workers: int
) -> None:
    lender = ready_lender(engine)
    loan_id = lender.loan_ids[0]
    with custody_serve(db_url, tmp_path, api_workers=str(workers)) as server:
        ok = {"method": "GET", "route": TEMPLATE, "status": "200"}
        refused = {"method": "GET", "route": TEMPLATE, "status": "401"}
        before_ok, before_refused = _count(server, **ok), _count(server, **refused)

        def get(i: int) -> int:
            # a connection per request, so the workers share them out
            headers = lender.headers("operator") if i % 4 else {}
            return httpx.get(
                f"{server.url}/v1/loans/{loan_id}", headers=headers, timeout=20
            ).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(get, range(40)))
        assert sorted(set(statuses)) == [200, 401]
        # Every scrape, whichever worker answers it, sees all 40.
        for _ in range(4):
            assert _count(server, **ok) - before_ok == statuses.count(200) == 30
            assert _count(server, **refused) - before_refused == statuses.count(401) == 10
        answer = httpx.get(f"{server.url}/v1/metrics", timeout=10).text
        assert f'route="/v1/loans/{loan_id}"' not in answer  # never the raw path
        assert 'custody_deposits{state="confirmed"} 0.0' in answer  # the database's figures
        tagged = httpx.get(
            f"{server.url}/v1/health", headers={"X-Request-Id": "scrape-test-1"}, timeout=10
        )
        assert tagged.headers["X-Request-Id"] == "scrape-test-1"
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert lines
    not_json = [line for line in lines if not _is_json_object(line)]
    assert not not_json, "lines of custody serve's log that are not JSON:\n" + "\n".join(not_json)
    assert any(json.loads(line).get("logger", "").startswith("uvicorn") for line in lines)


def _is_json_object(line: str) -> bool:
    try:
        parsed = json.loads(line)
    except ValueError:
        return False
    return isinstance(parsed, dict) and "event" in parsed and "timestamp" in parsed
