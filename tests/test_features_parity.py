"""Training/serving parity: the online vector of every scored payment equals the offline row.

The replay calls exactly what the API calls: `update_online` for every event in time order
and `online_payment_vector` for every payment, right after its own update.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from features_kit import compare, event_stream, online_backend

from features.events import Payment
from features.online import OnlineFeatures, online_payment_vector, update_online
from features.payment_features import PAYMENT_FEATURE_NAMES, payment_feature_frame
from features.simulate import SimulationConfig, simulate_to_dir

pytestmark = pytest.mark.parity


def replay(online: OnlineFeatures, events_dir: Path) -> pd.DataFrame:
    vectors = {}
    for _t, _kind, _id, event in event_stream(events_dir):
        update_online(online, event)
        if isinstance(event, Payment) and event.kind == "purchase":
            vectors[event.payment_id] = online_payment_vector(online, event)
    return pd.DataFrame.from_dict(vectors, orient="index")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "events"
    simulate_to_dir(SimulationConfig(users=400, days=30, seed=11, fraud_rate=0.1), out)
    return out


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=pytest.mark.realserver)])
def test_replayed_stream_matches_offline_point_in_time_vectors(
    simulated: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    offline = payment_feature_frame(simulated).set_index("payment_id")
    with online_backend(backend, monkeypatch) as online:
        vectors = replay(online, simulated)
    assert set(vectors.index) == set(offline.index)
    assert compare(vectors, offline, PAYMENT_FEATURE_NAMES) == []
    # the stream exercised what matters: bursts, shared instruments, known disputes, creators
    assert (offline["card_count_10m"] >= 3).any()
    assert (offline["device_distinct_users_30d"] >= 2).any()
    assert (offline["user_disputes_reported"] >= 1).any()
    assert (offline["creator_disputes_reported_30d"] >= 1).any()
    assert (offline["user_new_device"] == 1).any() and (offline["user_new_device"] == 0).any()
    assert offline["items_price_sum"].notna().all()
