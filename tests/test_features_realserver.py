"""The production configuration against the real servers: Redis online store + PostgreSQL registry.

Each run uses its own Feast project (random name), so runs never collide; the project's
Redis keys and registry rows are removed afterwards. With CI=true a missing server fails.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import IN_CI
from features_kit import compare, event_stream

from features.events import Payment
from features.online import (
    OnlineFeatures,
    delete_entities,
    online_payment_vector,
    score_online,
    update_online,
)
from features.payment_features import PAYMENT_FEATURE_NAMES, payment_feature_frame
from features.settings import Settings, get_settings
from features.simulate import SimulationConfig, simulate_to_dir
from features.store import (
    build_features,
    feature_store_config,
    open_feature_store,
    teardown_project,
)

pytestmark = pytest.mark.realserver

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _servers_or_skip() -> None:
    import psycopg
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=test sslmode=disable", connect_timeout=3
        ).close()
    except Exception as exc:
        message = f"Redis/PostgreSQL not reachable on 127.0.0.1: {type(exc).__name__}: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def production(monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    _servers_or_skip()
    monkeypatch.setenv("AIPIC_ONLINE_STORE", "redis")
    monkeypatch.setenv("AIPIC_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("AIPIC_FEAST_REGISTRY_URL", PG_URL)
    monkeypatch.setenv("AIPIC_FEAST_PROJECT", f"t_{uuid.uuid4().hex[:12]}")
    get_settings.cache_clear()
    s = get_settings()
    yield s
    store = open_feature_store(s)
    online = OnlineFeatures(s, store=store)
    online.state.clear()
    online.close()
    with contextlib.suppress(Exception):  # the project may never have been applied
        teardown_project(store)
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "events"
    simulate_to_dir(SimulationConfig(users=80, days=14, seed=5, fraud_rate=0.1), out)
    return out


def test_production_configuration_is_redis_and_postgres(production: Settings) -> None:
    cfg = feature_store_config(production)
    assert cfg["online_store"]["type"] == "redis"
    assert cfg["online_store"]["connection_string"] == (
        "127.0.0.1:6379,db=0,socket_timeout=0.5,socket_connect_timeout=0.5"  # Feast hands these to redis-py
    )
    assert cfg["registry"]["registry_type"] == "sql"
    assert (
        cfg["registry"]["path"].startswith("postgresql+psycopg://")
        and "sslmode=disable" in cfg["registry"]["path"]
    )


def test_build_apply_materialise_and_read_back(production: Settings, small_world: Path) -> None:
    summary = build_features(small_world, production)
    assert summary["configuration"] == "production"
    assert "fraud_user" in summary["materialized_views"]
    store = open_feature_store(production)
    assert {s.name for s in store.list_feature_services()} >= {"fraud_full", "fraud_no_device_location"}

    table = pd.read_parquet(production.feature_repo_dir / "offline" / "fraud_user.parquet")
    latest = table.sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    users = list(latest.index[:5])
    got = store.get_online_features(
        features=["fraud_user:user_count_30d", "fraud_user:user_amount_sum_24h", "user_profile:kyc_status"],
        entity_rows=[{"user_id": u} for u in users],
    ).to_df()
    assert list(got["user_count_30d"]) == list(latest.loc[users, "user_count_30d"])
    assert got["user_amount_sum_24h"].tolist() == pytest.approx(
        latest.loc[users, "user_amount_sum_24h"].tolist()
    )
    assert got["kyc_status"].notna().all()

    # the event state was loaded: the next payment of a known user sees that user's recent history
    online = OnlineFeatures(production, store=store)
    try:
        payments = pd.read_parquet(small_world / "payments.parquet")
        last = payments.sort_values("payment_time").iloc[-1].to_dict()
        last["item_ids"] = list(last["item_ids"])
        vec = online_payment_vector(online, Payment.model_validate(last))
        frame = payment_feature_frame(small_world).set_index("payment_id")
        assert (
            compare(
                pd.DataFrame({last["payment_id"]: vec}).T,
                frame.loc[[last["payment_id"]]],
                PAYMENT_FEATURE_NAMES,
            )
            == []
        )
    finally:
        online.close()


def test_redis_online_path_matches_offline_and_erases(production: Settings, small_world: Path) -> None:
    from features.store import apply_repo

    store = open_feature_store(production)
    apply_repo(store, production)
    online = OnlineFeatures(production, store=store)
    try:
        vectors = {}
        for _t, _k, _id, event in event_stream(small_world):
            if isinstance(event, Payment) and event.kind == "purchase":
                vectors[event.payment_id] = score_online(online, event)
            else:
                update_online(online, event)
        offline = payment_feature_frame(small_world).set_index("payment_id")
        assert compare(pd.DataFrame.from_dict(vectors, orient="index"), offline, PAYMENT_FEATURE_NAMES) == []

        row = offline.iloc[-1]
        target = row["user_id"]
        removed = delete_entities(online, "user", [target])
        assert removed > 0
        assert online._read_profiles("user_profile", "user_id", [target]) == [None]
        p = next(
            e for _t, _k, _i, e in event_stream(small_world) if getattr(e, "payment_id", None) == row.name
        )
        vec = online_payment_vector(online, p)
        assert vec["user_count_30d"] == 1.0 and math.isnan(vec["user_account_age_days"])
    finally:
        online.close()
