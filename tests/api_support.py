"""Shared world for the API tests: a small simulated marketplace and real LightGBM models in MLflow.

Built once per test process (session fixture): ~300 buyers over 30 days, the payment feature
frame, three small fraud boosters (one per tier) and two small rankers, registered with the
``champion`` alias in a real MLflow registry. Each test then gets its own database and var dir.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from features.settings import Settings
from models.bundle import ModelBundle, Thresholds
from serving.online import Vector

FRAUD_TIERS = ("full", "no_device_location", "request_only")
REC_TIERS = ("personalized", "limited")


@dataclass
class World:
    root: Path
    events_dir: Path
    mlflow_uri: str
    frame: pd.DataFrame  # payment features (offline), the stand-in online store's content
    payments: pd.DataFrame
    users: pd.DataFrame
    consent: pd.DataFrame

    def settings(self, var_dir: Path, copy_events: bool = False, **overrides: Any) -> Settings:
        """Settings of one test app; events are shared read-only unless ``copy_events`` (erasure)."""
        data = var_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        link = data / "marketplace"
        if not link.exists():
            if copy_events:
                shutil.copytree(self.events_dir, link)
            else:
                link.symlink_to(self.events_dir, target_is_directory=True)
        repo = var_dir / "feature_repo"
        if not repo.exists():  # each app scores against its own copy of the online stores
            shutil.copytree(self.root / "var" / "feature_repo", repo, ignore=shutil.ignore_patterns("*.yaml"))
        values: dict[str, Any] = {
            "var_dir": var_dir,
            "mlflow_tracking_uri": self.mlflow_uri,
            "model_poll_seconds": 0,
            "jwt_secret": "test-secret-" + "x" * 32,
        }
        values.update(overrides)
        return Settings(**values)


def _train_fraud(frame: pd.DataFrame, tier: str) -> ModelBundle:
    from training.fraud_data import tier_features

    names = [f.name for f in tier_features(tier)]
    x = frame[names].to_numpy(dtype=np.float64)
    y = frame["label"].to_numpy()
    params = {
        "objective": "binary",
        "num_leaves": 7,
        "min_data_in_leaf": 5,
        "learning_rate": 0.2,
        "verbosity": -1,
        "num_threads": 1,
        "deterministic": True,
        "seed": 1,
    }
    booster = lgb.train(params, lgb.Dataset(x, y, feature_name=names), num_boost_round=25)
    prob = 1 / (1 + np.exp(-booster.predict(x, raw_score=True)))
    review, decline = float(np.quantile(prob, 0.9)), float(np.quantile(prob, 0.98))
    return ModelBundle(
        name=f"fraud-{tier}",
        purpose="fraud_detection",
        tier=tier,
        feature_names=names,
        booster=booster,
        calibration=None,
        thresholds=Thresholds(review=review, decline=max(decline, review + 1e-6), rationale="test quantiles"),
    )


def _train_ranker(events_dir: Path, tier: str) -> ModelBundle:
    from features.rec_features import RecEvents
    from models.recommend import training_set

    events = RecEvents.from_dir(events_dir)
    t = pd.to_datetime(events.interactions["event_time"], utc=True)
    end = t.max()
    ts = training_set(events, end - pd.Timedelta(days=7), end, tier=tier)  # type: ignore[arg-type]
    params = {
        "objective": "lambdarank",
        "num_leaves": 7,
        "min_data_in_leaf": 5,
        "learning_rate": 0.2,
        "verbosity": -1,
        "num_threads": 1,
        "deterministic": True,
        "seed": 1,
    }
    data = lgb.Dataset(
        np.asarray(ts.X, dtype=np.float32), ts.y, group=ts.group, feature_name=list(ts.feature_names)
    )
    booster = lgb.train(params, data, num_boost_round=15)
    return ModelBundle(
        name=f"recommender-{tier}",
        purpose="personalised_recommendations" if tier == "personalized" else "limited_recommendations",
        tier=tier,
        feature_names=list(ts.feature_names),
        booster=booster,
    )


def _online_stores(events: Path, settings: Settings) -> None:
    """The real local online stores (Feast SQLite profiles, recommender rows + the event state),
    as `aipic features build` makes them, minus the offline fraud tables the API does not read."""
    from features.online import OnlineFeatures, load_state
    from features.rec_feast import build_tables
    from features.store import (
        apply_repo,
        materialize_repo,
        offline_dir,
        open_feature_store,
        write_profile_tables,
    )

    write_profile_tables(events, offline_dir(settings))
    build_tables(events, offline_dir(settings))  # recommender catalogue, item rows, histories
    store = open_feature_store(settings)
    apply_repo(store, settings)
    materialize_repo(store, settings)
    online = OnlineFeatures(settings, store=store)
    try:
        load_state(online, events)
    finally:
        online.close()


def build_world(root: Path) -> World:
    """Simulate, compute features, train and register every model the API serves."""
    import mlflow

    from features.payment_features import payment_feature_frame
    from features.simulate import SimulationConfig, simulate_to_dir
    from features.storage import read_table
    from training import registry

    events = root / "events"
    simulate_to_dir(SimulationConfig(users=300, days=30, seed=5, fraud_rate=0.08), events)
    frame = payment_feature_frame(events)
    payments = read_table(events, "payments")
    frame = frame.merge(payments[["payment_id", "fraud_pattern"]], on="payment_id", how="left")
    frame["label"] = (frame["fraud_pattern"].fillna("none") != "none").astype(int)
    settings = Settings(var_dir=root / "var", mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    _online_stores(events, settings)
    registry.configure(settings)
    registry.ensure_experiment("serving-tests", settings)
    bundles = [_train_fraud(frame, t) for t in FRAUD_TIERS] + [_train_ranker(events, t) for t in REC_TIERS]
    for bundle in bundles:
        with mlflow.start_run(run_name=bundle.name):
            example = pd.DataFrame(np.zeros((3, len(bundle.feature_names))), columns=bundle.feature_names)
            version = registry.log_bundle(bundle, example)
        registry.set_champion(bundle.name, version)
    frame.to_parquet(root / "frame.parquet")
    return load_world(root)


def load_world(root: Path) -> World:
    from features.storage import read_table

    events = root / "events"
    return World(
        root=root,
        events_dir=events,
        mlflow_uri=f"sqlite:///{root / 'mlflow.db'}",
        frame=pd.read_parquet(root / "frame.parquet"),
        payments=read_table(events, "payments"),
        users=read_table(events, "users"),
        consent=read_table(events, "consent_events"),
    )


def _scratch_root(shared: Path) -> Path:
    """Where the world lives: tmpfs when there is one (MLflow's SQLite set-up is fsync-bound: 10 s
    on disk, 1.5 s in memory), else the run's temp dir. Worlds of runs older than 6 hours are removed.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return shared / "api-world"
    for old in shm.glob("aipic-api-world-*"):
        if time.time() - old.stat().st_mtime > 6 * 3600:
            shutil.rmtree(old, ignore_errors=True)
    return shm / f"aipic-api-world-{hashlib.sha256(str(shared).encode()).hexdigest()[:12]}"


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Built once per test run: xdist workers share it (file lock), models are read-only.

    A use count kept under the same lock lets the last worker out delete it (it may sit in RAM).
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = _scratch_root(shared)
    lock_path = shared / "api-world.lock"
    with _locked(lock_path):
        if not (root / "READY").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            build_world(root)
            (root / "READY").touch()
        _add_user(root, +1)
    try:
        yield load_world(root)
    finally:
        with _locked(lock_path):
            if _add_user(root, -1) <= 0:
                shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _add_user(root: Path, delta: int) -> int:
    counter = root / "USERS"
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + delta))
    return n + delta


class FlakySource:
    """The real `features.online` source, with a switch that makes every store call fail.

    ``down = True`` stands for an unreachable online store (the Redis test does it for real);
    updates and interactions that reached the store are recorded for assertions.
    """

    def __init__(self, settings: Settings) -> None:
        from serving.feature_source import PipelineFeatureSource

        self.real = PipelineFeatureSource(settings)
        self.down = False
        self.updates: list[Mapping[str, Any]] = []
        self.interactions: list[Mapping[str, Any]] = []

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("store unreachable")

    def payment_vector(self, payment: Mapping[str, Any], names: Sequence[str]) -> Vector:
        self._check()
        return self.real.payment_vector(payment, names)

    def request_vector(self, payment: Mapping[str, Any]) -> Vector:
        return self.real.request_vector(payment)

    def score_payments(
        self, payments: Sequence[Mapping[str, Any]], names: Sequence[Sequence[str]]
    ) -> list[Vector]:
        self._check()
        vectors = self.real.score_payments(payments, names)
        self.updates.extend(payments)
        return vectors

    def update_interactions(self, events: Sequence[Mapping[str, Any]]) -> None:
        self._check()
        self.real.update_interactions(events)
        self.interactions.extend(events)


@dataclass
class Api:
    client: TestClient
    settings: Settings
    source: FlakySource
    world: World

    @property
    def services(self) -> Any:
        return self.client.app.state.services  # type: ignore[attr-defined]

    def key(self, *scopes: str) -> dict[str, str]:
        _, key = self.services.keys.create(list(scopes), "test")
        return {"X-API-Key": key}

    def person(self, subject: str, **ttl: Any) -> dict[str, str]:
        from serving.auth import issue_token

        token = issue_token(self.settings, subject, dt.timedelta(**ttl) if ttl else None)
        return {"Authorization": f"Bearer {token}"}

    def adult_payments(self, n: int = 1, riskiest: bool = True) -> list[str]:
        """Payments by people with a declared adult age (not routed to a human by policy)."""
        users = self.world.users.dropna(subset=["date_of_birth"])
        born = pd.to_datetime(users["date_of_birth"])
        adults = set(users.loc[born < pd.Timestamp.now() - pd.DateOffset(years=19), "user_id"].astype(str))
        frame = self.world.frame[self.world.frame["user_id"].astype(str).isin(adults)]
        if riskiest:
            raw = frame["label"].to_numpy()
            frame = frame.iloc[np.argsort(-raw, kind="stable")]
        return [str(p) for p in frame["payment_id"].head(n)]

    def payment_body(self, payment_id: str) -> dict[str, Any]:
        """A request body for a simulated payment (so the stand-in store has its stored features)."""
        p = self.world.payments.set_index("payment_id").loc[payment_id]
        body: dict[str, Any] = {
            "payment_id": payment_id,
            "user_id": str(p["user_id"]),
            "item_ids": [str(i) for i in p["item_ids"]],
            "amount": float(p["amount"]),
            "currency": "EUR",
            "payment_time": pd.Timestamp(p["payment_time"]).isoformat(),
        }
        for col in (
            "card_fingerprint",
            "card_bin_country",
            "billing_country",
            "device_id",
            "ip",
            "ip_country",
            "creator_id",
        ):
            if p[col] is not None and not pd.isna(p[col]):
                body[col] = str(p[col])
        return body


_LOADED: dict[tuple[str, str, str | None], ModelBundle] = {}


def cached_load(name: str, version: str | None = None) -> ModelBundle:
    """`training.registry.load_bundle`, memoised per registry, name and version for the test process.

    Loading from MLflow is real; only repeating it for every test app is avoided.
    """
    import mlflow

    from training.registry import load_bundle

    key = (mlflow.get_tracking_uri(), name, version)
    if key not in _LOADED:
        _LOADED[key] = load_bundle(name, version=version)
    return _LOADED[key]


def make_api(
    world: World,
    var_dir: Path,
    copy_events: bool = False,
    model_names: Sequence[str] | None = None,
    **overrides: Any,
) -> Iterator[Api]:
    from serving.app import create_app
    from serving.modelset import DEFAULT_MODELS

    settings = world.settings(var_dir, copy_events, **overrides)
    source = FlakySource(settings)
    app = create_app(
        settings,
        feature_source=lambda _s: source,
        model_loader=cached_load,
        model_names=tuple(model_names or DEFAULT_MODELS),
    )
    with TestClient(app) as client:
        yield Api(client, settings, source, world)


open_api = contextlib.contextmanager(make_api)
"""``with open_api(world, var_dir, **settings) as api:`` for tests that need their own settings."""


@pytest.fixture
def api_factory(world: World, tmp_path: Path) -> Callable[..., contextlib.AbstractContextManager[Api]]:
    """``with api_factory(**settings_overrides) as api:`` for tests that need their own settings."""
    count = iter(range(1000))

    def factory(**overrides: Any) -> contextlib.AbstractContextManager[Api]:
        return open_api(world, tmp_path / f"var{next(count)}", **overrides)

    return factory


@pytest.fixture
def api(world: World, isolated_settings: Path) -> Iterator[Api]:
    yield from make_api(world, isolated_settings)


@pytest.fixture(scope="module")
def shared_api(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One app for a module's read-only checks (bad input): saves the start-up per parameter."""
    yield from make_api(world, tmp_path_factory.mktemp("shared-api") / "var")
