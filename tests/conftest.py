"""Shared fixtures. Every test gets its own AIPIC_VAR_DIR so nothing touches ./var."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point every setting that writes to disk at a per-test directory."""
    from features.settings import get_settings

    var = tmp_path / "var"
    monkeypatch.setenv("AIPIC_VAR_DIR", str(var))
    get_settings.cache_clear()
    yield var
    get_settings.cache_clear()


def shared_file(*parts: str) -> Path:
    """A file of ../shared/data; missing data fails in CI and skips elsewhere."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if IN_CI:
            pytest.fail(f"shared data missing in CI: {path}")
        pytest.skip(f"shared data not present: {path}")
    return path


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its schema already migrated (migrating costs ~15 s)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{path}")
    MlflowClient().search_experiments()
    return path


@pytest.fixture
def mlflow_store(isolated_settings: Path, _mlflow_template: Path) -> Path:
    """A fresh, already-migrated MLflow store under this test's var dir; MLflow points at it."""
    import shutil

    from training import registry

    target = isolated_settings / "mlflow" / "mlflow.db"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_mlflow_template, target)
    registry.configure()
    return target


@pytest.fixture(scope="session")
def small_marketplace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small simulated marketplace shared by the training tests of a worker (read-only)."""
    from features.simulate import SimulationConfig, simulate_to_dir

    out = tmp_path_factory.mktemp("small-marketplace")
    simulate_to_dir(SimulationConfig(users=1500, days=75, seed=3), out)
    return out
