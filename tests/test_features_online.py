"""The online path: window edges, arrival order, duplicates, fresh users, bursts, erasure.

Property tests draw payments whose times sit on window boundaries (exactly W apart, one
microsecond either side), insert them in any order, some twice, and check that the online
vector of every payment equals the offline point-in-time row.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from features_kit import at, compare, online_backend, payment, user, write_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.events import Dispute, Payment, User
from features.online import (
    ERASABLE,
    OnlineFeatureError,
    OnlineFeatures,
    delete_entities,
    online_payment_vector,
    update_online,
)
from features.payment_features import PAYMENT_FEATURE_NAMES, WINDOWS, payment_feature_frame

EDGES = sorted({0, *(w + d for w in WINDOWS.values() for d in (-1, 0, 1))})


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.realserver)])
def online(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[OnlineFeatures]:
    with online_backend(request.param, monkeypatch) as o:
        yield o


payment_spec = st.tuples(
    st.sampled_from(EDGES),  # time offset: on or next to a window boundary
    st.sampled_from([0.01, 1.0, 9.99, 10.0, 250.5]),
    st.sampled_from(["u1", "u2"]),
    st.sampled_from(["fa", "fb"]),
    st.sampled_from([None, "d1", "d2"]),
    st.sampled_from([None, "DE", "FR"]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.lists(payment_spec, min_size=1, max_size=7),
    order=st.randoms(use_true_random=False),
    duplicates=st.lists(st.integers(0, 6), max_size=3),
    dispute_at=st.sampled_from([None, *EDGES[:12]]),
)
def test_any_arrival_order_and_duplicates_give_the_offline_vectors(
    online: OnlineFeatures, specs: list[tuple], order, duplicates: list[int], dispute_at: int | None
) -> None:
    rows = [
        payment(f"p{i}", us, amt, user=u, card_fingerprint=card, device_id=dev, ip_country=ctry, ip=dev)
        for i, (us, amt, u, card, dev, ctry) in enumerate(specs)
    ]
    disputes = []
    if dispute_at is not None:
        disputes = [
            {
                "dispute_id": "d0",
                "payment_id": "p0",
                "reason": "fraud",
                "reported_time": at(specs[0][0] + dispute_at),
            }
        ]
    with tempfile.TemporaryDirectory() as tmp:
        ev = write_events(Path(tmp) / "ev", rows, disputes=disputes)
        offline = payment_feature_frame(ev).set_index("payment_id")
    online.state.clear()
    for u in ("u1", "u2"):
        update_online(online, User.model_validate(user(u)))
    models = [Payment.model_validate(r) for r in rows]
    arrivals = models + [models[i] for i in duplicates if i < len(models)]
    order.shuffle(arrivals)
    for m in arrivals:
        assert update_online(online, m)
    for d in disputes:  # a dispute after its payment is known (it routes through the payment index)
        assert update_online(online, Dispute.model_validate(d))
    vectors = pd.DataFrame({m.payment_id: online_payment_vector(online, m) for m in models}).T
    assert compare(vectors, offline, PAYMENT_FEATURE_NAMES) == []


def test_a_bulk_write_split_into_chunks_is_applied_whole(
    online: OnlineFeatures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import features.online as online_module

    monkeypatch.setattr(online_module, "_WRITE_CHUNK", 3)  # Redis: many script calls in one pipeline
    rows = [
        payment(f"b{i}", i * 1000, 1.0 + i, user=f"u{i % 2}", device_id="d1", ip="10.0.0.1", ip_country="DE")
        for i in range(5)
    ]
    batch = online_module.StateBatch()
    for r in rows:
        batch.add_payment(online_module.record_of(r))
    online.state.write(batch)
    offline = payment_feature_frame(write_events(tmp_path / "ev", rows, users=[user("nobody")]))
    vectors = {r["payment_id"]: online_payment_vector(online, r) for r in rows}
    assert compare(pd.DataFrame(vectors).T, offline.set_index("payment_id"), PAYMENT_FEATURE_NAMES) == []


def test_a_user_with_no_history_or_profile(online: OnlineFeatures, tmp_path: Path) -> None:
    rows = [payment("p0", 0, 42.0, user="ghost", creator_id=None, card_fingerprint=None)]
    offline = payment_feature_frame(write_events(tmp_path / "ev", rows, users=[user("someone")])).set_index(
        "payment_id"
    )
    vec = online_payment_vector(online, Payment.model_validate(rows[0]))
    assert compare(pd.DataFrame({"p0": vec}).T, offline, PAYMENT_FEATURE_NAMES) == []
    assert vec["user_count_30d"] == 1.0 and math.isnan(vec["user_account_age_days"])


def test_a_card_testing_burst_is_visible_to_the_next_score_in_the_same_second(online: OnlineFeatures) -> None:
    counts = []
    for i in range(6):
        p = Payment.model_validate(payment(f"t{i}", i * 1000, 1.0, user=f"x{i}", card_fingerprint="stolen"))
        update_online(online, p)  # the scoring path applies the payment ...
        counts.append(online_payment_vector(online, p)["card_count_10m"])  # ... and reads its vector
    assert counts == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    last = Payment.model_validate(payment("t5", 5000, 1.0, user="x5", card_fingerprint="stolen"))
    assert online_payment_vector(online, last)["card_distinct_users_30d"] == 6.0


def test_the_api_mapping_interface(online: OnlineFeatures) -> None:
    body = payment("m1", 0, 3.0, device_id="d9")
    assert online.update_payment(body)
    vec = online.payment_vector(body, ["amount", "device_count_1h", "user_count_1h"])
    assert list(vec) == ["amount", "device_count_1h", "user_count_1h"]
    assert vec == {"amount": 3.0, "device_count_1h": 1.0, "user_count_1h": 1.0}
    assert set(online.request_vector(body)) == {
        "amount",
        "is_night",
        "is_weekend",
        "bin_billing_mismatch",
        "ip_bin_mismatch",
        "ip_billing_mismatch",
    }
    assert not online.update_payment({**body, "payment_id": "m2", "kind": "cancellation"})
    with pytest.raises(OnlineFeatureError):
        online.payment_vector({"payment_id": "m3"})
    with pytest.raises(OnlineFeatureError):
        online.payment_vector(body, ["no_such_feature"])


def test_erasing_payments_keeps_the_creator_counts_exact(online: OnlineFeatures, tmp_path: Path) -> None:
    rows = [
        payment("a0", 0, 5.0, user="u1"),
        payment("a1", 100, 6.0, user="u2", card_fingerprint="f2"),
        payment("a2", 200, 7.0, user="u1"),
        payment("a3", 300, 8.0, user="u3", card_fingerprint="f3"),
        payment("a4", 400, 9.0, user="u2", card_fingerprint="f2"),
    ]
    for r in rows:
        update_online(online, Payment.model_validate(r))
    assert (
        online_payment_vector(online, Payment.model_validate(rows[4]))["creator_distinct_buyers_30d"] == 3.0
    )
    assert delete_entities(online, "payment", ["a2"]) > 0  # u1's latest payment with the creator
    assert delete_entities(online, "card", ["f3"]) > 0  # u3's only one
    kept = [r for r in rows if r["payment_id"] not in ("a2", "a3")]
    offline = payment_feature_frame(write_events(tmp_path / "ev", kept, users=[user("nobody")]))
    vectors = {r["payment_id"]: online_payment_vector(online, Payment.model_validate(r)) for r in kept}
    assert compare(pd.DataFrame(vectors).T, offline.set_index("payment_id"), PAYMENT_FEATURE_NAMES) == []
    assert vectors["a4"]["creator_distinct_buyers_30d"] == 2.0


def test_delete_entities_erases_a_person_from_the_online_store(online: OnlineFeatures) -> None:
    update_online(online, User.model_validate(user("gone")))
    mine = [
        Payment.model_validate(payment(f"g{i}", i, 5.0, user="gone", card_fingerprint="fg", device_id="dg"))
        for i in range(3)
    ]
    other = Payment.model_validate(payment("o1", 10, 5.0, user="stay", card_fingerprint="fg", device_id="dg"))
    for p in [*mine, other]:
        update_online(online, p)
    before = online_payment_vector(online, other)
    assert (
        before["card_count_10m"] == 4.0 and before["user_account_age_days"] != before["user_account_age_days"]
    )
    assert online_payment_vector(online, mine[-1])["user_account_age_days"] == pytest.approx(90.0)

    removed = delete_entities(online, "user", ["gone"])
    assert removed > 0
    after_other = online_payment_vector(online, other)
    assert after_other["card_count_10m"] == 1.0  # the erased person's payments left the card's log too
    assert after_other["device_distinct_users_30d"] == 1.0
    again = online_payment_vector(online, mine[-1])
    assert again["user_count_30d"] == 1.0 and math.isnan(again["user_account_age_days"])
    assert online._read_profiles("user_profile", "user_id", ["gone"]) == [None]
    with pytest.raises(OnlineFeatureError):
        delete_entities(online, "planet", ["x"])
    assert "payment" in ERASABLE
