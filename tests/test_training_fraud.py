"""Fraud training through MLflow on a small simulated marketplace: tiers, labels, promotion."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from training import registry
from training.fraud import choose_thresholds, promote_fraud, train_fraud
from training.fraud_data import (
    DEGRADED_TIER,
    TrainingDataError,
    fraud_tiers,
    labelled_examples,
    split,
    tier_features,
)


@pytest.fixture
def events(small_marketplace: Path) -> Path:
    return small_marketplace


def test_tiers_come_from_the_registry_and_shrink() -> None:
    tiers = fraud_tiers()
    assert tiers[0] == "full" and tiers[-1] == DEGRADED_TIER
    sizes = [len(tier_features(t)) for t in tiers]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] > 0
    poorer = {f.name for f in tier_features("no_device_location")}
    assert not any(
        c.startswith(("user.device", "user.location"))
        for f in tier_features("no_device_location")
        for c in f.categories
    )
    assert {f.name for f in tier_features(DEGRADED_TIER)} <= poorer


def test_labels_only_once_reported(events: Path) -> None:
    ex = labelled_examples(events)
    slices, windows = split(ex, label_delay_days=20)
    every = pd.concat(slices.values())
    assert pd.to_datetime(every["payment_time"], utc=True).max() < windows.label_cutoff
    known = pd.to_datetime(every["label_known_at"], utc=True)
    # a dispute reported after the as-of time is not a label yet
    assert not (every["label"].astype(bool) & (known > windows.as_of)).any()
    assert (every.loc[every["label"] == 1, "label_known_at"].notna()).all()
    # slices are consecutive and disjoint in time
    edges = list(windows.edges.values())
    assert all(a[1] == b[0] for a, b in itertools.pairwise(edges))


def test_too_short_history_is_a_clear_error(events: Path) -> None:
    ex = labelled_examples(events)
    with pytest.raises(TrainingDataError, match="label delay"):
        split(ex, label_delay_days=400)


def test_thresholds_follow_cost_model_and_budget() -> None:
    from features.settings import get_settings

    s = get_settings()
    prob = np.linspace(0, 1, 10_001)
    t = choose_thresholds(prob, s)
    assert t.decline == pytest.approx(
        s.fraud_false_decline_cost / (s.fraud_false_decline_cost + s.fraud_chargeback_cost), abs=1e-6
    )
    assert t.review <= t.decline
    assert ((prob >= t.review) & (prob < t.decline)).mean() <= s.fraud_review_budget + 1e-3
    assert ((prob >= t.review) & (prob < t.decline)).mean() >= s.fraud_review_budget - 1e-3


def test_train_register_and_promote(events: Path, mlflow_store: Path) -> None:
    summary = train_fraud(events, ["no_device_location"], label_delay_days=20)
    tier = summary["tiers"]["no_device_location"]
    assert tier["champion"] is True and tier["version"] == "1"
    assert tier["metrics"]["auc_roc"] > 0.75
    bundle = registry.load_bundle("fraud-no_device_location")
    assert bundle.feature_names == [f.name for f in tier_features("no_device_location")]
    assert bundle.thresholds is not None and bundle.thresholds.review <= bundle.thresholds.decline

    # a second version is only a challenger; promotion scores both on the same window
    again = train_fraud(events, ["no_device_location"], label_delay_days=20)
    assert again["tiers"]["no_device_location"]["champion"] is False
    result = promote_fraud(events, "fraud-no_device_location")["fraud-no_device_location"]
    assert result["challenger"] == "2" and result["champion_before"] == "1"
    # identical data and seed give an identical model: a tie keeps the champion
    assert result["promoted"] is False
    assert registry.champion_version("fraud-no_device_location") == "1"


def test_cli_unknown_tier_and_missing_events(tmp_path: Path) -> None:
    from serving.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["train", "fraud", "--events", str(tmp_path)])
    assert res.exit_code == 2 and "aipic data simulate" in res.output
    assert "Traceback" not in res.output


def test_cli_train_prints_json(events: Path, mlflow_store: Path) -> None:
    from serving.cli import app

    res = CliRunner().invoke(
        app, ["train", "fraud", "--events", str(events), "--tier", DEGRADED_TIER, "--label-delay-days", "20"]
    )
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout[res.stdout.index("{") :])
    assert DEGRADED_TIER in payload["tiers"]


@pytest.mark.realserver
def test_postgresql_backend_store_trains_registers_and_promotes(
    events: Path, isolated_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Production: MLflow's tracking and registry on the real PostgreSQL server (fresh database)."""
    import os
    import uuid

    import psycopg

    from features.settings import get_settings

    name = f"mlflow_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL not reachable in CI: {exc}")
        pytest.skip("PostgreSQL not reachable")
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        monkeypatch.setenv(
            "AIPIC_MLFLOW_TRACKING_URI", f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        )
        get_settings.cache_clear()
        assert registry.configure().startswith("postgresql")
        summary = train_fraud(events, ["no_device_location"], label_delay_days=20)
        assert summary["tiers"]["no_device_location"]["champion"] is True
        assert registry.champion_version("fraud-no_device_location") == "1"
        train_fraud(events, ["no_device_location"], label_delay_days=20)
        result = promote_fraud(events, "fraud-no_device_location")["fraud-no_device_location"]
        assert (result["challenger"], result["champion_before"], result["promoted"]) == ("2", "1", False)
        assert registry.load_bundle("fraud-no_device_location").version == "1"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}") as conn:
            rows = conn.execute("SELECT name, alias, version FROM registered_model_aliases").fetchall()
        assert ("fraud-no_device_location", "champion", 1) in rows
    finally:
        get_settings.cache_clear()
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')  # FORCE: MLflow pools its connections
        admin.close()
