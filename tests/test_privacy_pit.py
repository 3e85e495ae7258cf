"""Point-in-time consent for training: each example judged at its own time, vectorised."""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.definitions import FeatureDef
from features.events import ConsentPurpose, ConsentStatus
from features.privacy.pit_consent import consent_valid_at, minor_at, training_mask, training_set

pytestmark = pytest.mark.consent

T0 = pd.Timestamp("2025-01-01", tz="UTC")
P = ConsentPurpose.PERSONALISATION.value
VALID = {"given", "renewed"}


def _events(rows: list[tuple[str, str, str, int]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "receipt_id": [f"r{i}" for i in range(len(rows))],
            "user_id": [r[0] for r in rows],
            "purpose": [r[1] for r in rows],
            "status": [r[2] for r in rows],
            "event_time": pd.to_datetime([T0 + pd.Timedelta(hours=r[3]) for r in rows], utc=True),
        }
    )


def _brute_force(events: pd.DataFrame, subject: str, t: pd.Timestamp, purpose: str) -> bool:
    mine = events[(events.user_id == subject) & (events.purpose == purpose) & (events.event_time <= t)]
    if mine.empty:
        return False
    last = mine.sort_values("event_time", kind="mergesort").iloc[-1]
    return bool(last.status in VALID)


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from([c.value for c in ConsentPurpose]),
            st.sampled_from([s.value for s in ConsentStatus]),
            st.integers(0, 20),
        ),
        max_size=25,
    ),
    queries=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "zz"]), st.integers(-2, 24)), min_size=1, max_size=30
    ),
)
def test_matches_brute_force(rows: list[tuple[str, str, str, int]], queries: list[tuple[str, int]]) -> None:
    events = _events(rows)
    subjects = [q[0] for q in queries]
    times = [T0 + pd.Timedelta(hours=q[1]) for q in queries]
    got = consent_valid_at(events, subjects, times, P)
    want = [_brute_force(events, s, t, P) for s, t in zip(subjects, times, strict=True)]
    assert got.tolist() == want


def test_withdrawal_and_exact_time_edges() -> None:
    events = _events([("a", P, "given", 1), ("a", P, "withdrawn", 5), ("a", P, "renewed", 9)])
    hours = [0, 1, 4, 5, 8, 9, 100]
    got = consent_valid_at(events, ["a"] * len(hours), [T0 + pd.Timedelta(hours=h) for h in hours], P)
    assert got.tolist() == [False, True, True, False, False, True, True]
    # missing time and unknown person: no consent
    assert consent_valid_at(events, ["a", "nobody"], [pd.NaT, T0 + pd.Timedelta(hours=3)], P).tolist() == [
        False,
        False,
    ]
    # another purpose's consent does not count
    assert not consent_valid_at(events, ["a"], [T0 + pd.Timedelta(hours=2)], ConsentPurpose.MARKETING).any()


def test_minor_at_example_time() -> None:
    dob = {"kid": dt.date(2008, 6, 15), "adult": dt.date(1990, 1, 1), "unknown": None}
    times = pd.to_datetime(["2026-06-14", "2026-06-15", "2026-06-14", "2026-06-14"], utc=True)
    got = minor_at(["kid", "kid", "adult", "unknown"], times, dob)
    assert got.tolist() == [True, False, False, False]


def test_training_set_drops_examples_and_features() -> None:
    feats = [
        FeatureDef("user_views", "user", "views", ("user.behavior.browsing_history",), "observed"),
        FeatureDef("item_pop", "item", "popularity", (), "derived"),
    ]
    events = _events([("a", P, "given", 0), ("a", P, "withdrawn", 10), ("b", P, "given", 5)])
    examples = pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "b", "c"],
            "event_time": [T0 + pd.Timedelta(hours=h) for h in (2, 12, 2, 6, 6)],
            "user_views": [1.0, 2.0, 3.0, 4.0, 5.0],
            "item_pop": [9.0, 8.0, 7.0, 6.0, 5.0],
            "label": [1, 0, 1, 0, 1],
        }
    )
    pers = training_set(examples, events, "personalised_recommendations", "personalized", feats)
    assert pers.frame["user_views"].tolist() == [1.0, 4.0]  # consent valid at the example's own time
    assert pers.feature_names == ["user_views", "item_pop"] and pers.dropped_features == []
    limited = training_set(examples, events, "personalised_recommendations", "limited", feats)
    assert limited.rows_kept == 5 and "user_views" not in limited.frame.columns
    assert limited.dropped_features == ["user_views"] and "label" in limited.frame.columns
    excluded = training_mask(
        examples, events, "personalised_recommendations", "limited", excluded_subjects={"c"}
    )
    assert excluded.tolist() == [True, True, True, True, False]


def test_vectorised_speed() -> None:
    rng = np.random.default_rng(0)
    n_events, n_examples = 50_000, 300_000
    events = pd.DataFrame(
        {
            "user_id": rng.integers(0, 5_000, n_events).astype(str),
            "purpose": P,
            "status": rng.choice(["given", "withdrawn", "renewed", "refused"], n_events),
            "event_time": T0 + pd.to_timedelta(rng.integers(0, 10**6, n_events), unit="s"),
        }
    )
    subjects = rng.integers(0, 5_000, n_examples).astype(str)
    times = T0 + pd.to_timedelta(rng.integers(0, 10**6, n_examples), unit="s")
    start = time.perf_counter()
    got = consent_valid_at(events, subjects, times, P)
    elapsed = time.perf_counter() - start
    assert got.shape == (n_examples,) and 0.1 < got.mean() < 0.9
    assert elapsed < 5.0, f"{elapsed:.2f}s for {n_examples} examples"
    sample = rng.choice(n_examples, 50, replace=False)
    for i in sample:
        assert got[i] == _brute_force(events, subjects[i], times[i], P)
