"""Training/serving parity: the online vector of every scored payment equals the offline row.

The replay calls exactly what the API calls, in time order: `score_online_many` for the purchases
(each one's vector, then the payment applied, as POST /v1/payments/score does for a batch of
requests) and `update_online` for every other event. Batches of one and of several consecutive
purchases must both give the offline rows: within a batch a later payment sees the earlier ones.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from features_kit import compare, event_stream, online_backend

from features.events import Payment
from features.online import OnlineFeatures, record_of, score_online_many, update_online
from features.payment_features import PAYMENT_FEATURE_NAMES, payment_feature_frame
from features.simulate import SimulationConfig, simulate_to_dir

pytestmark = pytest.mark.parity


def replay(online: OnlineFeatures, events_dir: Path, batch: int = 1) -> pd.DataFrame:
    """Purchases go to `score_online_many` in runs of up to ``batch`` consecutive ones (the API's
    request batches); any other event first flushes the run, then goes to `update_online`."""
    vectors: dict[str, dict[str, float]] = {}
    run: list[Payment] = []

    def flush() -> None:
        if run:
            out = score_online_many(online, [record_of(p) for p in run], [None] * len(run))
            vectors.update({p.payment_id: v for p, v in zip(run, out, strict=True)})
            run.clear()

    for _t, _kind, _id, event in event_stream(events_dir):
        if isinstance(event, Payment) and event.kind == "purchase":
            run.append(event)
            if len(run) >= batch:
                flush()
        else:
            flush()
            update_online(online, event)
    flush()
    return pd.DataFrame.from_dict(vectors, orient="index")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "events"
    simulate_to_dir(SimulationConfig(users=400, days=30, seed=11, fraud_rate=0.1), out)
    return out


@pytest.mark.parametrize(
    ("backend", "batch"),
    [("sqlite", 1), ("sqlite", 16), pytest.param("redis", 16, marks=pytest.mark.realserver)],
)
def test_replayed_stream_matches_offline_point_in_time_vectors(
    simulated: Path, backend: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    offline = payment_feature_frame(simulated).set_index("payment_id")
    with online_backend(backend, monkeypatch) as online:
        vectors = replay(online, simulated, batch)
    assert set(vectors.index) == set(offline.index)
    assert compare(vectors, offline, PAYMENT_FEATURE_NAMES) == []
    # the stream exercised what matters: bursts, shared instruments, known disputes, creators
    assert (offline["card_count_10m"] >= 3).any()
    assert (offline["device_distinct_users_30d"] >= 2).any()
    assert (offline["user_disputes_reported"] >= 1).any()
    assert (offline["creator_disputes_reported_30d"] >= 1).any()
    assert (offline["user_new_device"] == 1).any() and (offline["user_new_device"] == 0).any()
    assert offline["items_price_sum"].notna().all()
