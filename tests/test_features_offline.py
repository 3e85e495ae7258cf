"""Offline payment features: window edges, label timing, history statistics, null instruments."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from features_kit import payment, user, write_events

from features.events import Payment, arrow_schema
from features.payment_features import (
    KEY_COLUMNS,
    PAYMENT_FEATURE_NAMES,
    PAYMENT_FEATURES,
    FeaturePipelineError,
    payment_feature_frame,
)

S = 1_000_000
MIN = 60 * S
DAY = 86_400 * S


def frame_of(tmp_path: Path, payments: list[dict], **kw: object) -> pd.DataFrame:
    return payment_feature_frame(write_events(tmp_path / "ev", payments, **kw)).set_index("payment_id")  # type: ignore[arg-type]


def test_frame_shape_order_and_types(tmp_path: Path) -> None:
    rows = [payment("b", 5 * S), payment("a", 0), payment("c", 5 * S, kind="cancellation")]
    out = payment_feature_frame(write_events(tmp_path / "ev", rows))
    assert list(out.columns) == KEY_COLUMNS + PAYMENT_FEATURE_NAMES
    assert list(out["payment_id"]) == ["a", "b"]  # time order, cancellations are not payments to score
    assert all(out[c].dtype == "float64" for c in PAYMENT_FEATURE_NAMES)


def test_window_edge_is_half_open(tmp_path: Path) -> None:
    """(t - W, t]: an event exactly W earlier is outside, one microsecond later is inside."""
    f = frame_of(
        tmp_path,
        [
            payment("a0", 0, user="a", card_fingerprint="fa"),
            payment("a1", 10 * MIN, user="a", card_fingerprint="fa"),  # exactly 10 minutes later
            payment("b0", 0, user="b", card_fingerprint="fb"),
            payment("b1", 10 * MIN - 1, user="b", card_fingerprint="fb"),  # 1 µs inside
            payment("c0", 0, user="c", card_fingerprint="fc"),
            payment("c1", DAY, user="c", card_fingerprint="fc"),  # exactly 24 h
        ],
    )
    assert f.loc["a1", "user_count_10m"] == 1.0
    assert f.loc["a1", "user_count_1h"] == 2.0
    assert f.loc["b1", "user_count_10m"] == 2.0
    assert f.loc["b1", "card_amount_sum_10m"] == 20.0
    assert f.loc["c1", "user_count_24h"] == 1.0
    assert f.loc["c1", "user_count_7d"] == 2.0


def test_payments_at_the_same_microsecond_do_not_see_each_other(tmp_path: Path) -> None:
    f = frame_of(tmp_path, [payment("x", 0, 5.0), payment("y", 0, 7.0), payment("z", 1, 1.0)])
    assert f.loc["x", "user_count_10m"] == 1.0 and f.loc["y", "user_count_10m"] == 1.0
    assert f.loc["z", "user_count_10m"] == 3.0
    assert f.loc["z", "user_amount_max_10m"] == 7.0
    assert f.loc["z", "user_amount_mean_10m"] == pytest.approx(13.0 / 3)


def test_velocity_counts_sums_means_maxima(tmp_path: Path) -> None:
    amounts = [10.0, 0.01, 99.99, 20.0]
    rows = [payment(f"p{i}", i * MIN, a, card_fingerprint="f") for i, a in enumerate(amounts)]
    f = frame_of(tmp_path, rows)
    assert f.loc["p3", "user_count_10m"] == 4.0
    assert f.loc["p3", "user_amount_sum_10m"] == 130.0
    assert f.loc["p3", "card_amount_max_1h"] == 99.99
    assert f.loc["p3", "user_amount_mean_30d"] == 130.0 / 4
    assert f.loc["p0", "user_amount_sum_30d"] == 10.0  # the current payment is included


def test_history_relative_features_use_previous_payments_only(tmp_path: Path) -> None:
    rows = [
        payment("p0", 0, 10.0),
        payment("p1", MIN, 20.0),
        payment("p2", 2 * MIN, 30.0),
        payment("p3", 5 * MIN, 60.0),
    ]
    f = frame_of(tmp_path, rows)
    assert pd.isna(f.loc["p0", "user_amount_ratio_mean_30d"])  # no history
    assert pd.isna(f.loc["p0", "user_secs_since_prev_payment_30d"])
    assert pd.isna(f.loc["p1", "user_amount_zscore_30d"])  # one previous payment: no spread
    assert f.loc["p3", "user_amount_ratio_mean_30d"] == 3.0
    std = pd.Series([10.0, 20.0, 30.0]).std(ddof=0)
    assert f.loc["p3", "user_amount_zscore_30d"] == pytest.approx((60 - 20) / std, rel=1e-12)
    assert f.loc["p3", "user_secs_since_prev_payment_30d"] == 180.0


def test_disputes_count_from_their_reported_time_only(tmp_path: Path) -> None:
    report = 5 * DAY
    rows = [
        payment("p0", 0, card_fingerprint="f", creator_id="c"),
        payment("p1", report, card_fingerprint="f", creator_id="c"),  # same instant as the report
        payment("p2", report + 1, card_fingerprint="f", creator_id="c"),
        payment("p3", report + 7 * DAY, card_fingerprint="f", creator_id="c"),  # report exactly 7 d ago
        payment("p4", report + 7 * DAY - 1, user="v", card_fingerprint="g", creator_id="c"),
    ]
    disputes = [
        {
            "dispute_id": "d0",
            "payment_id": "p0",
            "reason": "fraud",
            "reported_time": rows[0]["payment_time"] + pd.Timedelta(microseconds=report),
        }
    ]
    f = frame_of(tmp_path, rows, disputes=disputes)
    assert f.loc["p0", "user_disputes_reported"] == 0.0
    assert f.loc["p1", "user_disputes_reported"] == 0.0
    assert f.loc["p2", "user_disputes_reported"] == 1.0
    assert f.loc["p2", "card_disputes_reported"] == 1.0
    assert f.loc["p4", "user_disputes_reported"] == 0.0  # another user, another card
    assert f.loc["p4", "creator_disputes_reported_7d"] == 1.0
    assert f.loc["p3", "creator_disputes_reported_7d"] == 0.0
    assert f.loc["p3", "creator_disputes_reported_30d"] == 1.0
    assert f.loc["p2", "creator_prior_payments"] == 2.0
    assert f.loc["p2", "creator_dispute_rate"] == 0.5
    assert pd.isna(f.loc["p0", "creator_dispute_rate"])


def test_distinct_counts_and_first_use(tmp_path: Path) -> None:
    rows = [
        payment("p0", 0, card_fingerprint="f1", device_id="d1", ip="1.1.1.1", ip_country="DE"),
        payment("p1", MIN, card_fingerprint="f2", device_id="d1", ip="1.1.1.2", ip_country="FR"),
        payment("p2", 2 * MIN, card_fingerprint="f1", device_id="d2", ip="1.1.1.2", ip_country="DE"),
        payment(
            "p3", 3 * MIN, user="w", card_fingerprint="f1", device_id="d2", ip="1.1.1.2", ip_country="DE"
        ),
        payment("p4", 31 * DAY, card_fingerprint="f3", device_id="d1", ip="9.9.9.9", ip_country="DE"),
    ]
    f = frame_of(tmp_path, rows)
    assert f.loc["p2", "user_distinct_cards_30d"] == 2.0
    assert f.loc["p2", "user_distinct_devices_30d"] == 2.0
    assert f.loc["p2", "user_distinct_countries_30d"] == 2.0
    assert f.loc["p3", "card_distinct_users_30d"] == 2.0
    assert f.loc["p3", "device_distinct_users_30d"] == 2.0
    assert f.loc["p3", "ip_distinct_users_30d"] == 2.0
    assert f.loc["p4", "user_distinct_devices_30d"] == 1.0  # earlier ones left the window
    assert [f.loc[p, "user_new_device"] for p in ("p0", "p1", "p2", "p4")] == [1.0, 0.0, 1.0, 0.0]
    assert [f.loc[p, "user_new_country"] for p in ("p0", "p1", "p2")] == [1.0, 1.0, 0.0]
    assert f.loc["p3", "user_new_card"] == 1.0  # first time for *this* user
    assert f.loc["p1", "user_country_ip_mismatch"] == 1.0  # declared DE, paid from FR


def test_missing_instruments_give_nulls_not_zeros(tmp_path: Path) -> None:
    """Imported data (fraud handbook) has no devices, IPs or countries: their features are null."""
    rows = [
        payment("p0", 0, card_fingerprint=None, creator_id=None),
        payment("p1", MIN, card_fingerprint=None),
    ]
    f = frame_of(tmp_path, rows, users=[user("u1", country=None)])
    for c in (
        "device_count_10m",
        "ip_amount_sum_1h",
        "card_count_24h",
        "card_disputes_reported",
        "user_new_device",
    ):
        assert pd.isna(f.loc["p1", c]), c
    assert pd.isna(f.loc["p0", "creator_payments_30d"])
    assert f.loc["p1", "user_distinct_devices_30d"] == 0.0
    assert pd.isna(f.loc["p1", "ip_bin_mismatch"])
    assert f.loc["p1", "user_count_10m"] == 2.0


def test_request_and_profile_features(tmp_path: Path) -> None:
    rows = [
        payment(
            "p0",
            0,
            12.345,
            card_bin_country="DE",
            billing_country="FR",
            ip_country="DE",
            item_ids=["i1", "i2"],
        ),
    ]
    items = [
        {
            "item_id": i,
            "creator_id": "c1",
            "style": "x",
            "tags": [],
            "price": p,
            "currency": "EUR",
            "created_time": rows[0]["payment_time"] - pd.Timedelta(days=d),
            "status": "active",
        }
        for i, p, d in (("i1", 5.0, 3), ("i2", 7.5, 1))
    ]
    f = frame_of(tmp_path, rows, items=items, users=[user("u1", signup_us=-2 * DAY, kyc_status="pending")])
    assert f.loc["p0", "amount"] == 12.35  # cents, half up
    assert f.loc["p0", "bin_billing_mismatch"] == 1.0 and f.loc["p0", "ip_bin_mismatch"] == 0.0
    assert f.loc["p0", "is_night"] == 0.0 and f.loc["p0", "is_weekend"] == 0.0
    assert f.loc["p0", "user_account_age_days"] == 2.0
    assert (f.loc["p0", "user_kyc_pending"], f.loc["p0", "user_kyc_verified"]) == (1.0, 0.0)
    assert (f.loc["p0", "items_count"], f.loc["p0", "items_price_sum"], f.loc["p0", "items_price_max"]) == (
        2.0,
        12.5,
        7.5,
    )
    assert f.loc["p0", "items_min_age_days"] == 1.0


def test_creator_concentration(tmp_path: Path) -> None:
    rows = [payment(f"p{i}", i * MIN, user=u, card_fingerprint=u) for i, u in enumerate(["a", "a", "b", "a"])]
    f = frame_of(tmp_path, rows)
    assert f.loc["p3", "creator_payments_30d"] == 4.0
    assert f.loc["p3", "creator_distinct_buyers_30d"] == 2.0
    assert f.loc["p3", "creator_repeat_share_30d"] == 0.5
    assert f.loc["p3", "creator_buyer_share_30d"] == 0.75


def test_duplicate_payment_ids_are_an_error(tmp_path: Path) -> None:
    ev = write_events(tmp_path / "ev", [payment("p0", 0)])
    table = pq.read_table(ev / "payments.parquet")
    pq.write_table(pa.concat_tables([table, table]).cast(arrow_schema(Payment)), ev / "payments.parquet")
    with pytest.raises(FeaturePipelineError, match="duplicate"):
        payment_feature_frame(ev)


def test_missing_events_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(FeaturePipelineError, match="not found"):
        payment_feature_frame(tmp_path / "nothing")


def test_feature_definitions_are_consistent() -> None:
    from fideslang.default_taxonomy import DEFAULT_TAXONOMY

    keys = {c.fides_key for c in DEFAULT_TAXONOMY.data_category}
    names = [f.name for f in PAYMENT_FEATURES]
    assert len(names) == len(set(names))
    for f in PAYMENT_FEATURES:
        assert f.categories and set(f.categories) <= keys, f.name
        assert f.source in ("provided", "observed", "derived")
        assert f.description.endswith("."), f.name
