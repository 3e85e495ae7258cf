"""MLflow round trip: a bundle logged and promoted comes back identical through the alias."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import mlflow
import numpy as np
import pandas as pd
import pytest

from models.bundle import ModelBundle, Thresholds
from models.fraud import PlattCalibrator
from training import registry


def _tiny_bundle(seed: int) -> tuple[ModelBundle, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"a": rng.normal(size=300), "b": rng.normal(size=300)})
    y = (X["a"] + rng.normal(scale=0.5, size=300) > 0).astype(int)
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "num_threads": 1, "seed": seed},
        lgb.Dataset(X, y),
        num_boost_round=10,
    )
    bundle = ModelBundle(
        name="fraud-test",
        purpose="fraud_detection",
        tier="full",
        feature_names=["a", "b"],
        booster=booster,
        calibration=PlattCalibrator(slope=1.0, intercept=0.0),
        thresholds=Thresholds(review=0.5, decline=0.9, rationale="test"),
    )
    return bundle, X


def test_log_promote_load_round_trip(mlflow_store: Path) -> None:
    registry.configure()
    registry.ensure_experiment("test")
    bundle, X = _tiny_bundle(0)
    with mlflow.start_run():
        version = registry.log_bundle(bundle, X)
    registry.set_champion("fraud-test", version)
    assert registry.champion_version("fraud-test") == version

    loaded = registry.load_bundle("fraud-test")
    assert loaded.version == version
    assert loaded.feature_names == ["a", "b"]
    assert loaded.thresholds == bundle.thresholds
    assert loaded.calibration == bundle.calibration
    assert loaded.model_hash == bundle.model_hash
    row = X.iloc[[5]].to_numpy()
    assert loaded.raw_score(row)[0] == bundle.raw_score(row)[0]
    contrib = loaded.contributions(row)
    assert contrib.sum() == pytest.approx(loaded.raw_score(row)[0], abs=1e-9)


def test_missing_model_is_a_clear_error(mlflow_store: Path) -> None:
    registry.configure()
    with pytest.raises(registry.ModelNotFound, match="aipic train"):
        registry.load_bundle("fraud-nothing")


def test_thresholds_map_probability_to_outcome() -> None:
    t = Thresholds(review=0.3, decline=0.8)
    assert [t.outcome(p) for p in (0.1, 0.3, 0.79, 0.8)] == ["approve", "review", "review", "decline"]


def test_project_run_nests_runs_under_mlflow_runs_own(
    mlflow_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `mlflow run` (MLFLOW_RUN_ID set) a tier's run is a child, free to log its own params."""
    from mlflow.tracking import MlflowClient

    registry.configure()
    registry.ensure_experiment("test")
    with mlflow.start_run() as project:
        mlflow.log_param("label_delay_days", "-1")  # the entry point's "use the default"
    monkeypatch.setenv("MLFLOW_RUN_ID", project.info.run_id)
    with registry.project_run():
        assert mlflow.active_run().info.run_id == project.info.run_id  # type: ignore[union-attr]
        with mlflow.start_run(run_name="fraud-full", nested=True) as child:
            mlflow.log_param("label_delay_days", "21")
    run = MlflowClient().get_run(child.info.run_id)
    assert run.info.run_id != project.info.run_id
    assert run.data.tags["mlflow.parentRunId"] == project.info.run_id
    assert run.data.params["label_delay_days"] == "21"
    assert MlflowClient().get_run(project.info.run_id).data.params["label_delay_days"] == "-1"


def test_mlflow_run_on_another_store_is_a_clear_error(
    mlflow_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from serving.cli import app

    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")  # made in ./mlruns, say
    result = CliRunner().invoke(app, ["train", "evaluate-fraud", "--events", str(mlflow_store.parent)])
    assert result.exit_code == 2
    assert "export MLFLOW_TRACKING_URI" in result.output
    assert "Traceback" not in result.output
