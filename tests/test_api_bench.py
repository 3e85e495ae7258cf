"""Pieces of `aipic bench serve` that decide its verdicts: server-side 2xx counts, latency summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

from serving.bench import _metric_2xx, _with_search_path
from serving.loadgen import Tally

if TYPE_CHECKING:
    from api_support import Api

pytest_plugins = ["api_support"]


def test_server_side_2xx_count_matches_the_decision_log(api: Api) -> None:
    headers = api.key("score", "recommend")
    for pid in api.world.frame["payment_id"].head(5):
        r = api.client.post("/v1/payments/score", json=api.payment_body(str(pid)), headers=headers)
        assert r.status_code == 200, r.text
    bad = api.client.post("/v1/payments/score", json={"bad": 1}, headers=headers)
    assert bad.status_code == 422  # not counted
    r = api.client.post("/v1/recommendations", json={"user_id": "x", "k": 2}, headers=headers)
    assert r.status_code == 200, r.text
    metrics = api.client.get("/metrics").text
    answered = _metric_2xx(metrics, "/v1/payments/score") + _metric_2xx(metrics, "/v1/recommendations")
    counts = [
        line for line in metrics.splitlines() if line.startswith("aipic_http_request_duration_seconds_count")
    ]
    assert answered == 6, counts
    assert api.services.decisions.count() == 6


def test_latency_summary_and_search_path() -> None:
    t = Tally(latencies=[i / 1000 for i in range(1, 101)], ok=98, non_2xx=1, failures=1)
    s = t.summary(elapsed=2.0)
    assert s["requests"] == 100 and s["errors"] == 2 and s["requests_per_s"] == 50.0
    assert 50 <= s["p50_ms"] <= 51 and 99 <= s["p99_ms"] <= 100
    assert _with_search_path("postgresql+psycopg://h/db", "s1").endswith("?options=-csearch_path%3Ds1")
    assert "&options=" in _with_search_path("postgresql+psycopg://h/db?x=1", "s1")


def test_server_cpu_per_request_is_read_from_proc() -> None:
    import os
    import time

    from serving.bench import _with_server_cpu, process_cpu_seconds

    before = process_cpu_seconds(os.getpid())
    assert before is not None and before >= 0
    assert process_cpu_seconds(2**22 + 7) is None  # no such process

    def busy() -> dict[str, object]:
        end = time.process_time() + 0.05
        while time.process_time() < end:
            pass
        return {"requests": 10}

    result = _with_server_cpu(os.getpid(), busy)
    assert result["server_cpu_ms_per_request"] is not None
    assert result["server_cpu_ms_per_request"] >= 3.0  # 50 ms of CPU over 10 requests (clock ticks: 10 ms)
