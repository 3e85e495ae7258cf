"""Recommender: features, candidates, ranker contract, business rules, reasons, tiers, metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from features.rec_features import (
    REC_FEATURES,
    RecEvents,
    build_state,
    pair_features,
    tier_feature_names,
    tier_features,
)
from models.candidates import SOURCES, CandidateConfig, generate
from models.ranker import LambdaRanker, RankerError
from models.rec_metrics import RankMetricError, per_user_metrics, ranking_metrics
from models.recommend import (
    MAX_K,
    BusinessRules,
    Recommender,
    RecommendError,
    RecRequest,
    rank_batch,
    recommend,
    training_set,
)

T0 = pd.Timestamp("2024-01-01", tz="UTC")
AS_OF = T0 + pd.Timedelta(days=60)
STYLES = ["anime", "landscape", "portrait", "abstract"]


def make_events(n_users: int = 120, n_items: int = 80, n_creators: int = 10, seed: int = 0) -> RecEvents:
    """A small marketplace: persons prefer one style, buy within it and view more than they buy."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame(
        {
            "item_id": [f"i{j}" for j in range(n_items)],
            "creator_id": [f"c{j % n_creators}" for j in range(n_items)],
            "style": [STYLES[j % len(STYLES)] for j in range(n_items)],
            "price": rng.uniform(2, 40, n_items).round(2),
            "created_time": [T0 + pd.Timedelta(days=int(d)) for d in rng.integers(0, 50, n_items)],
            "status": "active",
        }
    )
    created = items["created_time"].to_numpy()
    style_of = np.arange(n_items) % len(STYLES)
    rows = []
    for u in range(n_users):
        fav = u % len(STYLES)
        pool = np.flatnonzero(style_of == fav)
        n_ev = int(rng.integers(5, 25))
        picks = np.where(rng.random(n_ev) < 0.85, rng.choice(pool, n_ev), rng.integers(0, n_items, n_ev))
        days = rng.uniform(0, 75, n_ev)
        kinds = np.where(rng.random(n_ev) < 0.4, "purchase", "view")
        for j, d, kind in zip(picks, days, kinds, strict=True):
            t = max(T0 + pd.Timedelta(days=float(d)), pd.Timestamp(created[j]) + pd.Timedelta(hours=1))
            rows.append((f"u{u}", f"i{j}", kind, t, int(rng.integers(1, 3))))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "event_time", "quantity"])
    creators = pd.DataFrame(
        {"creator_id": [f"c{c}" for c in range(n_creators)], "user_id": [None] * n_creators}
    )
    creators.loc[0, "user_id"] = "u0"  # person u0 is also creator c0
    return RecEvents(inter, items, creators)


@pytest.fixture(scope="module")
def events() -> RecEvents:
    return make_events()


@pytest.fixture(scope="module")
def state(events: RecEvents):
    return build_state(events, AS_OF)


@pytest.fixture(scope="module")
def ranker(events: RecEvents) -> LambdaRanker:
    rules = BusinessRules(allow_repeats=False)
    ts = training_set(events, AS_OF - pd.Timedelta(days=20), AS_OF, rules=rules, config=CandidateConfig(n=40))
    return LambdaRanker(n_estimators=20, min_child_samples=5, n_jobs=1).fit(
        ts.X, ts.y, ts.group, feature_names=ts.feature_names
    )


# --- features -----------------------------------------------------------------------------


def test_limited_tier_has_no_personal_features() -> None:
    limited = tier_features("limited")
    assert limited, "the limited tier needs some inputs"
    assert all(not f.categories for f in limited)
    assert not any(f.name.startswith(("user_", "ui_")) for f in limited)
    personal = [f for f in REC_FEATURES if f.categories]
    assert personal and all(f.name not in tier_feature_names("limited") for f in personal)


def test_declared_categories_exist_in_fideslang() -> None:
    from fideslang.default_taxonomy import DEFAULT_TAXONOMY

    keys = {c.fides_key for c in DEFAULT_TAXONOMY.data_category}
    used = {c for f in REC_FEATURES for c in f.categories}
    assert used <= keys
    assert {"user.behavior.purchase_history", "user.behavior.browsing_history"} <= used
    assert len({f.name for f in REC_FEATURES}) == len(REC_FEATURES)


def test_state_is_point_in_time(events: RecEvents, state) -> None:
    """Adding events at or after the snapshot time changes nothing in it."""
    future = events.interactions.copy()
    future["event_time"] = AS_OF + pd.Timedelta(hours=1)
    more = RecEvents(
        pd.concat([events.interactions, future], ignore_index=True), events.items, events.creators
    )
    other = build_state(more, AS_OF)
    rows = np.repeat(np.arange(10), 5)
    cols = np.tile(np.arange(5), 10)
    a = pair_features(state, rows, cols)
    b = pair_features(other, rows, cols)
    np.testing.assert_array_equal(np.nan_to_num(a, nan=-7), np.nan_to_num(b, nan=-7))
    assert state.buys.nnz < build_state(more, AS_OF + pd.Timedelta(days=1)).buys.nnz


def test_pair_features_known_values(events: RecEvents, state) -> None:
    names = tier_feature_names("personalized")
    inter = events.interactions
    buys = inter[(inter["event_type"] == "purchase") & (pd.to_datetime(inter["event_time"]) < AS_OF)]
    u, i = buys.iloc[0]["user_id"], buys.iloc[0]["item_id"]
    row, col = state.user_row(u), state.item_col(i)
    x = pair_features(state, np.array([row, -1]), np.array([col, col]), names=names)
    expected = int(((buys["user_id"] == u) & (buys["item_id"] == i)).sum())
    assert x[0, names.index("ui_n_purchases")] == expected
    assert x[0, names.index("ui_days_since_purchase")] >= 0
    assert np.isnan(x[1, names.index("ui_n_purchases")])  # unknown person: missing, not zero
    assert x[0, names.index("item_pop_all")] == x[1, names.index("item_pop_all")]  # item features shared
    assert not np.isnan(x[0, names.index("ui_style_affinity")])


def test_features_of_a_row_do_not_depend_on_other_rows(state) -> None:
    """The decision log rebuilds the input of the returned items only: it must match exactly."""
    row = state.user_row("u5")
    c = generate(state, np.array([row]), config=CandidateConfig(n=60))
    full = pair_features(state, np.full(len(c.items), row), c.items)
    pick = np.array([0, 7, 3])
    part = pair_features(state, np.full(3, row), c.items[pick])
    np.testing.assert_array_equal(np.nan_to_num(full[pick], nan=-7), np.nan_to_num(part, nan=-7))
    mixed = pair_features(state, np.array([row, state.user_row("u6"), row]), c.items[pick])
    np.testing.assert_allclose(np.nan_to_num(mixed[[0, 2]], nan=-7), np.nan_to_num(part[[0, 2]], nan=-7))


# --- candidates -----------------------------------------------------------------------------


def test_candidates_tagged_by_source(state) -> None:
    rows = np.array([state.user_row("u1"), state.user_row("u2"), -1])
    c = generate(state, rows, config=CandidateConfig(n=120))
    names = set(c.source_names())
    assert names <= set(SOURCES)
    assert {"rebuy", "co_purchase", "popular"} <= names
    for r in range(3):
        mine = c.items[c.rows == r]
        assert len(mine) == len(set(mine)) <= 120
    # an unknown person only gets item-level sources
    assert set(c.source_names()[c.rows == 2]) <= {"trending", "new", "popular"}
    # re-buy candidates are exactly items the person bought
    r0 = (c.rows == 0) & (c.source_names() == "rebuy")
    assert (state.buys[rows[0]].toarray().ravel()[c.items[r0]] > 0).all()


def test_limited_tier_ignores_the_profile(state) -> None:
    rows = np.array([state.user_row("u1"), state.user_row("u2")])
    ctx = np.array([state.item_col("i3"), state.item_col("i3")])
    c = generate(state, rows, tier="limited", context=ctx, config=CandidateConfig(n=30))
    assert not set(c.source_names()) & {"rebuy", "co_purchase", "co_view", "style", "creator"}
    assert "context" in set(c.source_names())
    np.testing.assert_array_equal(c.items[c.rows == 0], c.items[c.rows == 1])


# --- ranker ---------------------------------------------------------------------------------


def test_ranker_fit_predict_contract(tmp_path) -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(600, 4))
    y = (X[:, 0] + 0.1 * rng.normal(size=600) > 1.0).astype(int)
    group = np.full(30, 20)
    model = LambdaRanker(n_estimators=30, min_child_samples=5, n_jobs=1)
    with pytest.raises(RankerError):
        model.predict(X)
    assert model.fit(X, y, group, feature_names=["a", "b", "c", "d"]) is model
    scores = model.predict(X[:20])
    assert scores.shape == (20,)
    # learned the signal: on fresh data the relevant rows (large a) rank above the others
    Xt = rng.normal(size=(400, 4))
    yt = Xt[:, 0] > 1.0
    st = model.predict(Xt)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(yt, st) > 0.9
    assert max(model.feature_importance(), key=model.feature_importance().get) == "a"
    with pytest.raises(RankerError):
        model.fit(X, y, [10, 10])  # groups do not cover the rows
    with pytest.raises(RankerError):
        model.predict(X[:, :3])
    again = LambdaRanker.load(model.save(tmp_path / "ranker.txt"))
    np.testing.assert_allclose(again.predict(X[:20]), scores)
    assert clone(model).get_params()["n_estimators"] == 30


# --- business rules and reasons --------------------------------------------------------------


def _recommender(state, ranker, **rules) -> Recommender:
    return Recommender(
        state,
        {"personalized": ranker, "limited": _limited_ranker()},
        BusinessRules(**rules),
        CandidateConfig(n=60),
    )


def _limited_ranker() -> LambdaRanker:
    """Any ranker on the limited tier's inputs (the rules, not the model, are under test)."""
    names = tier_feature_names("limited")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, len(names)))
    y = (rng.random(200) < 0.2).astype(int)
    return LambdaRanker(n_estimators=5, min_child_samples=5, n_jobs=1).fit(
        X, y, [20] * 10, feature_names=names
    )


def test_never_own_or_bought_or_unavailable(events: RecEvents, ranker) -> None:
    items = events.items.copy()
    items.loc[items["item_id"] == "i5", "status"] = "removed"
    items.loc[items["item_id"] == "i9", "status"] = "flagged"
    items.loc[items["item_id"] == "i13", "status"] = "unavailable"
    st = build_state(RecEvents(events.interactions, items, events.creators), AS_OF)
    rec = _recommender(st, ranker, allow_repeats=False, max_per_creator=None, blocked_items=frozenset({"i1"}))
    for user in ["u0", "u4", "u8"]:
        out = recommend(rec, RecRequest(user_id=user, k=30))
        ids = {r.item_id for r in out}
        bought = set(st.items[st.bought[st.user_row(user)].indices])
        assert ids and not ids & bought
        assert not ids & {"i5", "i9", "i13", "i1"}
        if user == "u0":  # u0 is creator c0: never their own pictures
            own = set(items.loc[items["creator_id"] == "c0", "item_id"])
            assert not ids & own
    # with repeats allowed, past purchases may come back
    rec_rep = _recommender(st, ranker, allow_repeats=True, max_per_creator=None)
    out = recommend(rec_rep, RecRequest(user_id="u4", k=30))
    bought = set(st.items[st.bought[st.user_row("u4")].indices])
    assert {r.item_id for r in out} & bought


def test_per_creator_cap_and_k_bounds(state, ranker) -> None:
    rec = _recommender(state, ranker, max_per_creator=2)
    out = recommend(rec, RecRequest(user_id="u3", k=12))
    assert 0 < len(out) <= 12
    creators = pd.Series([state.creators[state.item_creator[state.item_col(r.item_id)]] for r in out])
    assert creators.value_counts().max() <= 2
    for bad in (0, -1, MAX_K + 1):
        with pytest.raises(RecommendError):
            recommend(rec, RecRequest(user_id="u3", k=bad))
    with pytest.raises(RecommendError):
        BusinessRules(max_per_creator=0)
    scores = [r.score for r in out]
    assert scores == sorted(scores, reverse=True)


def test_every_item_has_a_reason(state, ranker) -> None:
    rec = _recommender(state, ranker, allow_repeats=False)
    out = recommend(rec, RecRequest(user_id="u6", k=20))
    assert out and all(r.reason and r.source in SOURCES for r in out)
    by_source = {r.source: r.reason for r in out}
    if "co_purchase" in by_source:
        assert by_source["co_purchase"].startswith("because you bought")
    for r in out:
        if r.source == "trending":
            assert r.reason.startswith("popular in") and r.reason.endswith("this week")
    cold = recommend(rec, RecRequest(user_id="nobody", k=5))
    assert cold and all(r.source in {"trending", "new", "popular"} for r in cold)


def test_limited_tier_request_uses_context_only(state, ranker) -> None:
    rec = _recommender(state, ranker)
    a = recommend(rec, RecRequest(user_id="u1", k=8, tier="limited", context_item_id="i2"))
    b = recommend(rec, RecRequest(user_id=None, k=30, tier="limited", context_item_id="i2"))
    assert a and {r.source for r in a} <= {"context", "trending", "new", "popular"}
    assert "i2" not in {r.item_id for r in a}  # not the picture already on screen
    assert any(r.reason.startswith("people who liked") for r in a)
    # nothing of u1's history is used, not even to filter purchases (no personal data without
    # consent): u1 gets exactly the anonymous list
    assert [(r.item_id, r.score) for r in a] == [(r.item_id, r.score) for r in b[:8]]
    wide = recommend(rec, RecRequest(user_id="u1", k=30, tier="limited", context_item_id="i2"))
    assert [(r.item_id, r.score, r.reason) for r in wide] == [(r.item_id, r.score, r.reason) for r in b]
    bought = set(state.items[state.bought[state.user_row("u1")].indices])
    assert {r.item_id for r in wide} & bought  # what u1 bought is not looked at, so it may come back
    # the person's own pictures (who owns which creator account, not their history) stay out
    own = {str(state.items[c]) for c in np.flatnonzero(state.item_creator == state.creators.get_loc("c0"))}
    mine = recommend(rec, RecRequest(user_id="u0", k=30, tier="limited", context_item_id="i2"))
    assert mine and not {r.item_id for r in mine} & own and {r.item_id for r in b} & own


def test_rank_batch_matches_single_requests(state, ranker) -> None:
    rules = BusinessRules(allow_repeats=False, max_per_creator=3)
    batch = rank_batch(state, ranker, ["u1", "u2"], rules=rules, k=5, config=CandidateConfig(n=60))
    rec = Recommender(state, {"personalized": ranker}, rules, CandidateConfig(n=60))
    for user in ("u1", "u2"):
        single = [r.item_id for r in recommend(rec, RecRequest(user_id=user, k=5))]
        assert batch.loc[batch["user_id"] == user].sort_values("rank")["item_id"].tolist() == single


def test_training_set_labels_next_purchases(events: RecEvents) -> None:
    cutoff = AS_OF - pd.Timedelta(days=20)
    ts = training_set(
        events, cutoff, AS_OF, rules=BusinessRules(allow_repeats=True), config=CandidateConfig(n=40)
    )
    assert ts.X.shape == (len(ts.y), len(ts.feature_names)) and ts.group.sum() == len(ts.y)
    assert 0 < ts.candidate_recall <= 1
    # every group has a positive, and positives are real purchases of the window
    starts = np.r_[0, np.cumsum(ts.group)[:-1]]
    assert (np.add.reduceat(ts.y, starts) > 0).all()
    sampled = training_set(
        events,
        cutoff,
        AS_OF,
        rules=BusinessRules(allow_repeats=True),
        config=CandidateConfig(n=40),
        negatives=5,
    )
    assert sampled.y.sum() == ts.y.sum()  # every positive kept
    s_starts = np.r_[0, np.cumsum(sampled.group)[:-1]]
    assert (sampled.group - np.add.reduceat(sampled.y, s_starts) <= 5).all()
    assert len(sampled.y) < len(ts.y)
    limited = training_set(
        events, cutoff, AS_OF, tier="limited", with_context=True, config=CandidateConfig(n=40)
    )
    assert limited.feature_names == tier_feature_names("limited")
    assert not np.isnan(limited.X[:, limited.feature_names.index("ctx_same_style")]).all()


# --- metrics -------------------------------------------------------------------------------


def test_ndcg_and_recall_known_cases() -> None:
    recs = pd.DataFrame(
        {
            "user": ["a", "a", "a", "b", "b", "c"],
            "item": ["x", "y", "z", "x", "y", "q"],
            "rank": [1, 2, 3, 1, 2, 1],
        }
    )
    rel = pd.DataFrame({"user": ["a", "b", "b", "b", "d"], "item": ["y", "x", "y", "w", "x"]})
    per = per_user_metrics(recs, rel, k=10)
    # a: one hit at rank 2 -> (1/log2 3) / 1
    assert per.loc["a", "ndcg"] == pytest.approx(1 / np.log2(3))
    assert per.loc["a", "recall"] == 1.0
    # b: hits at ranks 1, 2 of 3 relevant -> (1 + 1/log2 3) / (1 + 1/log2 3 + 1/2)
    assert per.loc["b", "ndcg"] == pytest.approx((1 + 1 / np.log2(3)) / (1 + 1 / np.log2(3) + 0.5))
    assert per.loc["b", "recall"] == pytest.approx(2 / 3)
    # d has relevant items but no list: zero; c has no relevant items: left out
    assert per.loc["d", "ndcg"] == 0.0 and "c" not in per.index
    m = ranking_metrics(recs, rel, k=1, catalogue_size=10)
    assert m["ndcg"] == pytest.approx((0 + 1 + 0) / 3)  # at k=1 only b's top item is a hit
    assert m["coverage"] == pytest.approx(2 / 10)  # x and q shown at rank 1
    with pytest.raises(RankMetricError):
        ranking_metrics(pd.concat([recs, recs]), rel)
