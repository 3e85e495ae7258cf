"""The recommender's Feast rows on the production configuration (Redis + PostgreSQL registry)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_features_realserver import production  # noqa: F401  (fixture)
from test_rec_parity import _record

from features.rec_feast import (
    CONTEXT_INPUT,
    HISTORY_VIEW,
    ITEM_INPUT,
    ITEM_VIEW,
    TIME_INPUT,
    build_tables,
    history_store,
    load_catalogue,
)
from features.rec_features import (
    RecEvents,
    build_state,
    pair_features,
    person_state,
    tier_feature_names,
    ts_to_us,
)
from features.settings import Settings
from features.simulate import SimulationConfig, simulate_to_dir
from features.store import apply_repo, materialize_repo, offline_dir, open_feature_store

pytestmark = pytest.mark.realserver


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "events"
    simulate_to_dir(SimulationConfig(users=100, days=14, seed=17, fraud_rate=0.05), out)
    return out


def test_history_rows_on_redis_feed_the_same_vectors(production: Settings, world: Path) -> None:  # noqa: F811
    inter = pd.read_parquet(world / "interactions.parquet")
    times = pd.to_datetime(inter["event_time"], utc=True)
    cut = pd.Timestamp(times.quantile(0.8)).floor("h")
    build_tables(world, offline_dir(production), as_of=cut)
    store = open_feature_store(production)
    apply_repo(store, production)
    assert set(materialize_repo(store, production)) >= {ITEM_VIEW, HISTORY_VIEW}
    cat = load_catalogue(offline_dir(production))
    events = RecEvents.from_dir(world)
    hs = history_store(store)

    later = inter[(times >= cut).to_numpy()].sort_values("event_time").head(40)
    records = [_record(r) for _, r in later.iterrows()]
    assert hs.append(records) == len(records)
    assert hs.append(records[:3]) == 0  # idempotent
    now = pd.Timestamp(later["event_time"].max()) + pd.Timedelta(seconds=1)
    offline = build_state(events, now, catalogue=cat)
    for uid in sorted({str(r["user_id"]) for r in records})[:8]:
        state = person_state(cat, uid, hs.read(uid), now)
        row_on, row_off = state.user_row(uid), offline.user_row(uid)
        assert (row_on >= 0) == (row_off >= 0)
        if row_on < 0:
            continue
        cols = np.arange(min(40, len(cat.items)))
        a = pair_features(state, np.full(len(cols), row_on), cols)
        b = pair_features(offline, np.full(len(cols), row_off), cols)
        np.testing.assert_array_equal(np.nan_to_num(a, nan=-7.0), np.nan_to_num(b, nan=-7.0))

    uid = str(records[0]["user_id"])
    items = [str(i) for i in cat.items[:10]]
    rows = [
        {"user_id": uid, "item_id": i, ITEM_INPUT: i, CONTEXT_INPUT: items[0], TIME_INPUT: ts_to_us(now)}
        for i in items
    ]
    got = store.get_online_features(
        features=store.get_feature_service("recommender_personalized"), entity_rows=rows
    ).to_df()
    state = person_state(cat, uid, hs.read(uid), now)
    names = tier_feature_names("personalized")
    want = pair_features(
        state,
        np.full(len(items), state.user_row(uid)),
        cat.items.get_indexer(pd.Index(items)),
        np.zeros(len(items), int),
        names,
    )
    np.testing.assert_array_equal(
        np.nan_to_num(got[names].to_numpy(np.float64).astype(np.float32), nan=-7.0),
        np.nan_to_num(want, nan=-7.0),
    )
