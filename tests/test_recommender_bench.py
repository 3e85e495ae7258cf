"""`aipic bench online-retail` end to end on a small slice of the real data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.conftest import shared_file

METRIC_KEYS = {"ndcg_at_10_all", "ndcg_at_10_new", "recall_at_10_all", "recall_at_10_new", "coverage"}


@pytest.fixture(scope="module")
def retail_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 300 customers and their 400 most bought items: a few seconds instead of minutes."""
    src = pd.read_parquet(shared_file("online-retail", "transactions.parquet"))
    customers = src["CustomerID"].dropna().unique()
    chosen = np.random.default_rng(3).choice(customers, 300, replace=False)
    part = src[src["CustomerID"].isin(chosen)]
    top = part["StockCode"].value_counts().index[:400]
    out = tmp_path_factory.mktemp("retail") / "transactions.parquet"
    part[part["StockCode"].isin(top)].to_parquet(out, index=False)
    return out


@pytest.mark.slow
def test_bench_online_retail_writes_every_figure(retail_slice: Path, tmp_path: Path) -> None:
    from serving.cli import app

    out = tmp_path / "retail.json"
    result = CliRunner().invoke(
        app,
        ["bench", "online-retail", "--data", str(retail_slice), "--json", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    for name in ("aipic", "most_popular", "rebuy_then_popular", "ease", "als"):
        assert set(doc[name]) == METRIC_KEYS, name
        assert all(0.0 <= doc[name][k] <= 1.0 for k in METRIC_KEYS)
    assert doc["latency"]["p99_ms"] >= doc["latency"]["p50_ms"] > 0
    assert doc["latency"]["candidates"] == 300
    assert doc["protocol"]["users"] > 20
    # the ranker learned something: it beats showing everyone the same popular list
    assert doc["aipic"]["ndcg_at_10_all"] > doc["most_popular"]["ndcg_at_10_all"]
    assert "aipic" in result.output and "p99" in result.output


def test_bench_online_retail_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    from serving.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["bench", "online-retail", "--data", str(tmp_path / "nope.parquet")])
    assert missing.exit_code == 2 and "not found" in missing.output
    dates = runner.invoke(
        app, ["bench", "online-retail", "--data", str(tmp_path), "--train-end", "2011-13-45"]
    )
    assert dates.exit_code == 2 and "date" in dates.output
    order = runner.invoke(
        app, ["bench", "online-retail", "--train-end", "2011-09-01", "--test-end", "2011-08-01"]
    )
    assert order.exit_code == 2 and "after" in order.output
