"""`aipic bench features`' online part: replays live traffic through the scoring path and reports it."""

from __future__ import annotations

from pathlib import Path

import pytest
from features_kit import REDIS_URL, require_redis

from features.bench import bench_online
from features.settings import Settings
from features.simulate import SimulationConfig, simulate_to_dir


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-sim") / "events"
    simulate_to_dir(SimulationConfig(users=150, days=20, seed=3), out)
    return out


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=pytest.mark.realserver)])
def test_online_bench_times_reads_score_calls_and_updates(events: Path, backend: str, tmp_path: Path) -> None:
    if backend == "redis":
        require_redis()
    base = Settings(var_dir=tmp_path / "var", redis_url=REDIS_URL)
    r = bench_online(events, backend, 40, base)
    assert r["backend"] == backend
    for part in ("read", "score_path", "update"):
        assert r[part]["n"] == 40
        assert 0 < r[part]["p50_ms"] <= r[part]["p99_ms"]
    assert r["client_cpu_ms_per_score"] > 0
    assert r["state"]  # the state held the history before the live payments
    assert not (tmp_path / "var" / "bench").exists() or not any((tmp_path / "var" / "bench").iterdir())


def test_more_live_payments_than_the_data_holds_is_a_clear_error(events: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="live payments asked for"):
        bench_online(events, "sqlite", 10**6, Settings(var_dir=tmp_path / "var"))
