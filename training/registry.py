"""MLflow tracking and registry: where bundles are logged, registered, promoted and loaded.

Registered model names are ``<purpose-family>-<tier>`` (``fraud-full``, ``recommender-limited``);
the serving alias is ``champion``. The bundle's metadata (inputs, calibration, thresholds) is
stored in the MLflow model's own ``metadata`` so a version is self-describing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from features.settings import Settings, get_settings
from models.bundle import ModelBundle

CHAMPION = "champion"
PIP_REQUIREMENTS = ["lightgbm>=4.6,<5", "numpy>=1.26,<3", "pandas>=2.2,<3"]


class RegistryError(RuntimeError):
    """MLflow is not set up the way the command needs (e.g. `mlflow run` on another store)."""


class ModelNotFound(LookupError):
    """No registered version behind the requested name/alias."""


def configure(settings: Settings | None = None) -> str:
    """Point MLflow at the configured backend store (SQLite under var/mlflow by default)."""
    s = settings or get_settings()
    uri = s.resolved_mlflow_uri
    if uri.startswith("sqlite:///"):
        s.mlflow_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@contextmanager
def project_run() -> Iterator[None]:
    """Inside `mlflow run`, resume the project's run so every run we start nests under it."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or mlflow.active_run() is not None:
        yield
        return
    try:
        experiment = MlflowClient().get_run(run_id).info.experiment_id
    except MlflowException as exc:
        raise RegistryError(
            f"`mlflow run` created run {run_id} in another tracking store than {mlflow.get_tracking_uri()}: "
            "export MLFLOW_TRACKING_URI to the same store (see the README) and run again"
        ) from exc
    mlflow.set_experiment(experiment_id=experiment)
    # `start_run(nested=True)` would resume MLFLOW_RUN_ID instead of creating a child run (and
    # then refuse our parameters as changed): hide it while the project's run is active.
    os.environ.pop("MLFLOW_RUN_ID")
    try:
        with mlflow.start_run(run_id=run_id):
            yield
    finally:
        os.environ["MLFLOW_RUN_ID"] = run_id


def ensure_experiment(name: str, settings: Settings | None = None) -> str:
    """Create (once) and select an experiment whose artifacts live under var/mlflow/artifacts.

    Under `mlflow run` the project's run (and so its experiment) is already chosen: keep it.
    """
    active = mlflow.active_run()
    if active is not None:
        return active.info.experiment_id
    s = settings or get_settings()
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(name, artifact_location=f"{s.mlflow_artifacts_uri}/{name}")
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def log_bundle(bundle: ModelBundle, example: pd.DataFrame) -> str:
    """Log the booster with signature and input example inside the active run; register it.

    Returns the new registered version (as a string).
    """
    from mlflow.models import infer_signature

    sig = infer_signature(example, np.zeros(len(example)))
    info = mlflow.lightgbm.log_model(
        bundle.booster,
        name="model",
        signature=sig,
        input_example=example.head(3),
        pip_requirements=PIP_REQUIREMENTS,
        metadata={"aipic": bundle.meta(), "model_hash": bundle.model_hash},
        registered_model_name=bundle.name,
    )
    version = str(info.registered_model_version)
    bundle.version = version
    return version


def set_champion(name: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, CHAMPION, version)


def champion_version(name: str) -> str | None:
    try:
        mv = MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(mv.version)


def load_bundle(name: str, version: str | None = None, alias: str = CHAMPION) -> ModelBundle:
    """Load a registered version (or the alias) as a ModelBundle with a native Booster."""
    client = MlflowClient()
    try:
        if version:
            mv = client.get_model_version(name, version)
        else:
            mv = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise ModelNotFound(f"{name}@{version or alias} is not registered: run `aipic train` first") from exc
    uri = f"models:/{name}/{mv.version}"
    booster = mlflow.lightgbm.load_model(uri)
    meta: dict[str, Any] = mlflow.models.get_model_info(uri).metadata or {}
    if "aipic" not in meta:
        raise ModelNotFound(f"{uri} has no aipic bundle metadata")
    return ModelBundle.from_meta(meta["aipic"], booster, version=str(mv.version))


@dataclass(frozen=True)
class PromotionResult:
    name: str
    challenger: str
    champion_before: str | None
    promoted: bool
    metric: str
    challenger_score: float
    champion_score: float | None

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()
