"""The generated Feast repo (local configuration): services per tier, build, retrieval, erasure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from features.feature_repo import ENTITY_JOIN_KEYS, feast_objects, feature_services
from features.payment_features import (
    DEVICE_LOCATION_PREFIXES,
    PAYMENT_FEATURE_NAMES,
    PAYMENT_FEATURES,
    REQUEST_FEATURES,
    fraud_tier_features,
)
from features.privacy.erasure import FeastOnline, erase_online_entities
from features.settings import get_settings
from features.simulate import SimulationConfig, simulate_to_dir
from features.store import feature_store_config, open_feature_store


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "events"
    simulate_to_dir(SimulationConfig(users=120, days=14, seed=9, fraud_rate=0.1), out)
    return out


def test_one_service_per_model_and_tier_decided_by_categories() -> None:
    services = feature_services()
    assert services["fraud_full"] == PAYMENT_FEATURE_NAMES
    limited = services["fraud_no_device_location"]
    assert limited == fraud_tier_features("no_device_location")
    by_name = {f.name: f for f in PAYMENT_FEATURES}
    for name in PAYMENT_FEATURE_NAMES:
        touches = any(c.startswith(p) for c in by_name[name].categories for p in DEVICE_LOCATION_PREFIXES)
        assert (name in limited) == (not touches), name
    assert {"amount", "card_count_10m", "user_kyc_verified", "creator_dispute_rate"} <= set(limited)
    assert not {"device_count_10m", "ip_bin_mismatch", "user_new_country"} & set(limited)


def test_generated_objects(tmp_path: Path) -> None:
    objs = feast_objects(tmp_path)
    assert {e: objs.entities[e].join_key for e in objs.entities} == {
        e: ENTITY_JOIN_KEYS[e] for e in objs.entities
    }
    assert set(objs.on_demand_views) == {"fraud_request", "recommender_user_item", "recommender_request"}
    assert [f.name for f in objs.on_demand_views["fraud_request"].features] == REQUEST_FEATURES
    assert not objs.feature_views["fraud_payment"].online  # one row per payment: offline only
    for name, svc in objs.services.items():
        got = [f.name for proj in svc.feature_view_projections for f in proj.features]
        assert sorted(got) == sorted(feature_services()[name])


def test_local_configuration() -> None:
    cfg = feature_store_config(get_settings())
    assert cfg["online_store"]["type"] == "sqlite"
    assert cfg["offline_store"] == {"type": "duckdb"}
    assert cfg["registry"]["path"].startswith("sqlite:///")


def test_build_command_then_historical_and_online_retrieval_and_erasure(world: Path) -> None:
    from serving.cli import app

    result = CliRunner().invoke(app, ["features", "build", "--events", str(world)])
    assert result.exit_code == 0, result.output
    s = get_settings()
    store = open_feature_store(s)
    assert {sv.name for sv in store.list_feature_services()} == {
        "fraud_full",
        "fraud_no_device_location",
        "recommender_personalized",
        "recommender_limited",
    }

    # historical retrieval through the service equals the frame (each payment's own row as of its time)
    frame = pd.read_parquet(s.feature_repo_dir / "offline" / "fraud_payment.parquet")
    payments = pd.read_parquet(world / "payments.parquet").set_index("payment_id")
    sample = payments.loc[frame["payment_id"].iloc[::7]]
    entity_df = pd.DataFrame(
        {
            "payment_id": sample.index,
            **{
                ENTITY_JOIN_KEYS[e]: sample[ENTITY_JOIN_KEYS[e]].to_numpy()
                for e in ("user", "card", "device", "ip", "creator")
            },
            "event_timestamp": sample["payment_time"].to_numpy(),
            "payment_amount": sample["amount"].to_numpy(),
            "payment_ts_us": (sample["payment_time"] - pd.Timestamp("1970-01-01", tz="UTC")).to_numpy()
            // pd.Timedelta(microseconds=1),
            "card_bin_country": sample["card_bin_country"].to_numpy(),
            "billing_country": sample["billing_country"].to_numpy(),
            "ip_country": sample["ip_country"].to_numpy(),
        }
    )
    hist = store.get_historical_features(
        entity_df=entity_df, features=store.get_feature_service("fraud_full")
    ).to_df()
    from features.payment_features import payment_feature_frame

    expected = payment_feature_frame(world).set_index("payment_id").loc[hist["payment_id"]]
    got = hist.set_index("payment_id")[PAYMENT_FEATURE_NAMES].astype(float)
    pd.testing.assert_frame_equal(
        got, expected[PAYMENT_FEATURE_NAMES], check_exact=False, rtol=1e-9, atol=1e-9
    )

    # online: materialised profile and the on-demand request features
    uid = str(sample["user_id"].iloc[0])
    row = store.get_online_features(
        features=["user_profile:kyc_status", "fraud_request:amount", "fraud_request:is_weekend"],
        entity_rows=[
            {
                "user_id": uid,
                "payment_amount": 12.345,
                "payment_ts_us": 1_772_971_200_000_000,
                "card_bin_country": None,
                "billing_country": None,
                "ip_country": None,
            }
        ],
    ).to_dict()
    assert row["kyc_status"][0] is not None and row["amount"] == [12.35] and row["is_weekend"] == [1.0]

    assert sum(erase_online_entities({"user_id": [uid]}, feast=FeastOnline.from_store(store)).values()) >= 1
    gone = store.get_online_features(
        features=["user_profile:kyc_status"], entity_rows=[{"user_id": uid}]
    ).to_dict()
    assert gone["kyc_status"] == [None]


def test_build_without_events_is_a_clear_error(tmp_path: Path) -> None:
    from serving.cli import app

    result = CliRunner().invoke(app, ["features", "build", "--events", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "not found" in result.output and "Traceback" not in result.output
