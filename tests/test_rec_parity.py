"""Training/serving parity of the recommender: every recommendation request of a replay.

The feature build runs as of S (catalogue artifact, Feast item rows and person histories,
materialised). Then the interactions after S are replayed in time order through the function
POST /v1/events calls (`OnlineFeatures.update_interactions`), and before every k-th of them a
recommendation request is served through the API's code (`RecommenderHolder`: Feast history
read, `person_state`, candidates, `pair_features`). Its model input, for every candidate, must
equal within 1e-9 the offline point-in-time input: `build_state(events, t, catalogue=S)`, the
snapshot the training sets are built from, as of the request time.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from features.online import OnlineFeatures
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
    REC_FEATURES,
    RecEvents,
    build_state,
    pair_features,
    person_state,
    tier_feature_names,
    ts_to_us,
)
from features.settings import get_settings
from features.simulate import SimulationConfig, simulate_to_dir
from features.storage import read_table
from features.store import apply_repo, materialize_repo, offline_dir, open_feature_store
from models.bundle import ModelBundle
from models.candidates import CandidateConfig
from models.recommend import Recommender, RecRequest, score_request, training_set
from serving.recsys import RecommenderHolder, build_recommender

pytestmark = pytest.mark.parity

TOL = 1e-9
EVERY = 7  # a request before every 7th replayed interaction


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "events"
    simulate_to_dir(SimulationConfig(users=160, days=24, seed=13, fraud_rate=0.05), out)
    return out


def _bundles(events: RecEvents, cut: pd.Timestamp) -> dict[str, ModelBundle]:
    """Small rankers per tier: parity is about the inputs, but the requests need a model."""
    out = {}
    for tier in ("personalized", "limited"):
        ts = training_set(
            events,
            cut - pd.Timedelta(days=5),
            cut,
            tier=tier,
            config=CandidateConfig(n=60),
            with_context=True,
        )
        params = {"objective": "lambdarank", "num_leaves": 7, "min_data_in_leaf": 5, "verbosity": -1}
        params |= {"num_threads": 1, "deterministic": True, "seed": 1}
        data = lgb.Dataset(ts.X, ts.y, group=ts.group, feature_name=list(ts.feature_names))
        out[tier] = ModelBundle(
            name=f"recommender-{tier}",
            purpose="personalised_recommendations",
            tier=tier,
            feature_names=list(ts.feature_names),
            booster=lgb.train(params, data, num_boost_round=8),
        )
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    return bool(a.shape == b.shape and (both_nan | np.isclose(a, b, rtol=TOL, atol=TOL)).all())


def _record(row: pd.Series) -> dict[str, object]:
    """An interaction as the events route hands it to the online store."""
    return {
        "event_id": str(row["event_id"]),
        "user_id": str(row["user_id"]),
        "item_id": str(row["item_id"]),
        "event_type": str(row["event_type"]),
        "event_time": pd.Timestamp(row["event_time"]).to_pydatetime(),
        "quantity": int(row["quantity"]),
    }


def test_replayed_requests_match_offline_point_in_time_vectors(simulated: Path) -> None:
    s = get_settings()
    inter = read_table(simulated, "interactions").sort_values(["event_time", "event_id"], kind="stable")
    times = pd.to_datetime(inter["event_time"], utc=True)
    cut = pd.Timestamp(times.quantile(0.7)).floor("h")
    events = RecEvents.from_dir(simulated)

    summary = build_tables(simulated, offline_dir(s), as_of=cut)
    assert summary["persons"] > 50
    store = open_feature_store(s)
    apply_repo(store, s)
    assert set(materialize_repo(store, s)) >= {ITEM_VIEW, HISTORY_VIEW}
    cat = load_catalogue(offline_dir(s))
    assert cat.as_of == cut

    bundles = _bundles(events, cut)
    holder = RecommenderHolder(simulated, s)
    holder.rebuild(bundles)
    rankers = build_recommender(cat, bundles).rankers
    online = OnlineFeatures(s, store=store)
    at_cut = build_state(events, cut, catalogue=cat)
    template = Recommender(state=at_cut, rankers=rankers)
    replay = inter[(times >= cut).to_numpy()]
    requests = personalised_known = fresh_purchases = candidates = 0
    try:
        for k, (_, row) in enumerate(replay.iterrows()):
            if k % EVERY == 0:
                t = pd.Timestamp(row["event_time"])
                now = t.to_pydatetime()
                uid = str(row["user_id"])
                tier = "personalized" if (k // EVERY) % 3 else "limited"
                context = str(row["item_id"]) if tier == "limited" else None
                req = RecRequest(user_id=uid, k=10, tier=tier, context_item_id=context)  # type: ignore[arg-type]
                state_on, served = holder.score_online(req, now)
                offline_state = build_state(events, t, catalogue=cat)
                offline = score_request(replace(template, state=offline_state), req)
                c_on, c_off = served.scored.candidates, offline.scored.candidates
                assert np.array_equal(c_on.items, c_off.items) and np.array_equal(
                    c_on.sources, c_off.sources
                ), f"request {requests}: different candidates"
                assert _same(served.scored.features, offline.scored.features), (
                    f"request {requests} ({tier}, {uid})"
                )
                assert served.scored.scores is not None and offline.scored.scores is not None
                assert _same(served.scored.scores, offline.scored.scores)
                logged = holder.recommend_logged(req, now)
                cols = offline_state.items.get_indexer(pd.Index([i.item_id for i in logged.items]))
                row_off = offline_state.user_row(uid) if tier == "personalized" else -1
                ctx = offline_state.item_col(context)
                again = pair_features(
                    offline_state,
                    np.full(len(cols), row_off),
                    cols,
                    np.full(len(cols), ctx),
                    logged.feature_names,
                )
                assert _same(logged.vectors, again)
                requests += 1
                candidates += len(c_on)
                if tier == "personalized" and served.row >= 0:
                    personalised_known += 1
                    before = at_cut.user_row(uid)
                    bought_at_cut = at_cut.buys[before].sum() if before >= 0 else 0.0
                    fresh_purchases += int(state_on.buys[served.row].sum() > bought_at_cut)
            online.update_interactions([_record(row)])
        # the same event twice changes nothing
        last = _record(replay.iloc[-1])
        assert history_store(store).append([last]) == 0
    finally:
        online.close()
    assert requests >= 40 and candidates > 1000
    assert personalised_known >= 10
    assert fresh_purchases >= 3  # the online rows did move with the replayed purchases


def test_feature_services_serve_the_same_values(simulated: Path) -> None:
    """Feast's own FeatureService retrieval (on-demand views) equals the serving path."""
    s = get_settings()
    inter = read_table(simulated, "interactions")
    times = pd.to_datetime(inter["event_time"], utc=True)
    cut = pd.Timestamp(times.quantile(0.8)).floor("h")
    build_tables(simulated, offline_dir(s), as_of=cut)
    store = open_feature_store(s)
    apply_repo(store, s)
    materialize_repo(store, s)
    cat = load_catalogue(offline_dir(s))
    uid = str(inter.loc[(times < cut).to_numpy(), "user_id"].value_counts().index[0])
    now = cut + pd.Timedelta(hours=6)
    state = person_state(cat, uid, history_store(store).read(uid), now)  # what serving builds
    row = state.user_row(uid)
    assert row >= 0
    items = list(cat.items[:25])
    ctx = items[3]
    rows = [
        {"user_id": uid, "item_id": i, ITEM_INPUT: i, CONTEXT_INPUT: ctx, TIME_INPUT: ts_to_us(now)}
        for i in items
    ]
    for tier in ("personalized", "limited"):
        service = store.get_feature_service(f"recommender_{tier}")
        got = store.get_online_features(features=service, entity_rows=rows).to_df()
        names = tier_feature_names(tier)
        r = row if tier == "personalized" else -1
        cols = cat.items.get_indexer(pd.Index(items))
        want = pair_features(
            state, np.full(len(items), r), cols, np.full(len(items), cat.items.get_loc(ctx)), names
        )
        # the model matrix is float32 (`pair_features`); Feast keeps the stored item rows in float64
        feast = got[names].to_numpy(dtype=np.float64).astype(np.float32)
        bad = [n for j, n in enumerate(names) if not _same(feast[:, j], want[:, j])]
        assert bad == [], f"{tier}: {bad}"
        served = {p.name for p in service.feature_view_projections}
        if tier == "limited":  # no personal view, not even the history it would read
            assert served == {"recommender_item", "recommender_request"}
            assert not any(f.categories for f in REC_FEATURES if f.name in set(names))
