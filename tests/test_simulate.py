"""The marketplace simulator: consistent tables, planted fraud with delayed labels, same seed same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from features.events import (
    TABLES,
    ConsentPurpose,
    ConsentStatus,
    DisputeReason,
    FraudPattern,
    arrow_schema,
)
from features.simulate import (
    FRAUD_MIX,
    MAX_DISPUTE_DAYS,
    TRUTH_DIR,
    USERS_TRUTH,
    SimulationConfig,
    SimulationError,
    simulate_to_dir,
)
from features.storage import read_table, validate

SIX_PATTERNS = set(FRAUD_MIX)
FRAUD_ONLY = {p.value for p in SIX_PATTERNS - {FraudPattern.FRIENDLY_FRAUD}}
SMALL = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
configs = st.builds(
    SimulationConfig,
    users=st.integers(30, 80),
    days=st.integers(3, 10),
    seed=st.integers(0, 2**32 - 1),
)


def _t(times: pd.Series) -> np.ndarray:
    """UTC times as a plain datetime64 array (fast comparisons)."""
    return times.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()


def _load(out: Path) -> dict[str, pd.DataFrame]:
    return {name: read_table(out, name) for name in TABLES}


def _simulate(tmp: Path, cfg: SimulationConfig) -> tuple[dict[str, object], dict[str, pd.DataFrame]]:
    summary = simulate_to_dir(cfg, tmp, progress=False)
    return summary, _load(tmp)


def _check_consistency(t: dict[str, pd.DataFrame], cfg: SimulationConfig) -> None:
    """Invariants every simulated marketplace must satisfy."""
    users, items, pay, inter = t["users"], t["items"], t["payments"], t["interactions"]
    disputes, consent, creators = t["disputes"], t["consent_events"], t["creators"]
    signup = pd.Series(_t(users["signup_time"]), index=users["user_id"])
    created = pd.Series(_t(items["created_time"]), index=items["item_id"])

    # every id refers to something that exists, and happened after it existed
    assert set(inter["user_id"]) <= set(signup.index)
    assert set(pay["user_id"]) <= set(signup.index)
    assert (_t(inter["event_time"]) > signup.loc[inter["user_id"]].to_numpy()).all()
    assert (_t(inter["event_time"]) > created.loc[inter["item_id"]].to_numpy()).all()
    assert (_t(pay["payment_time"]) > signup.loc[pay["user_id"]].to_numpy()).all()
    assert pay["payment_time"].is_monotonic_increasing
    assert inter["event_time"].is_monotonic_increasing
    start, end = pd.Timestamp(cfg.start), pd.Timestamp(cfg.start) + pd.Timedelta(days=cfg.days)
    assert pay["payment_time"].between(start, end, inclusive="left").all()
    assert inter["event_time"].between(start, end, inclusive="left").all()

    # a payment buys 1+ items of one seller, amount = sum of prices, and leaves purchase rows
    assert (pay["item_ids"].map(len) >= 1).all()
    bought = pay[
        ["payment_id", "user_id", "payment_time", "device_id", "ip", "creator_id", "item_ids"]
    ].explode("item_ids")
    bought = bought.rename(columns={"item_ids": "item_id"})
    item_info = items.set_index("item_id")
    assert (_t(bought["payment_time"]) > created.loc[bought["item_id"]].to_numpy()).all()
    assert (
        item_info.loc[bought["item_id"], "creator_id"].to_numpy() == bought["creator_id"].to_numpy()
    ).all()
    price_sum = item_info.loc[bought["item_id"], "price"].groupby(bought["payment_id"].to_numpy()).sum()
    np.testing.assert_allclose(
        pay.set_index("payment_id").loc[price_sum.index, "amount"], price_sum, atol=0.005
    )
    assert set(pay["currency"]) <= {"EUR"}
    purchases = inter[inter["event_type"] == "purchase"]
    cols = ["user_id", "item_id", "device_id", "ip"]
    left = bought.rename(columns={"payment_time": "event_time"})[[*cols, "event_time"]]
    right = purchases[[*cols, "event_time"]]
    key = [*cols, "event_time"]
    pd.testing.assert_frame_equal(
        left.sort_values(key).reset_index(drop=True),
        right.sort_values(key).reset_index(drop=True),
        check_dtype=False,
    )

    # disputes refer to payments, come after them, within 120 days, and match the planted truth
    by_id = pay.set_index("payment_id")
    assert set(disputes["payment_id"]) <= set(by_id.index)
    assert disputes["payment_id"].is_unique
    delay = _t(disputes["reported_time"]) - _t(by_id.loc[disputes["payment_id"], "payment_time"])
    assert (delay > np.timedelta64(0)).all()
    assert (delay <= np.timedelta64(MAX_DISPUTE_DAYS, "D")).all()
    pattern = by_id.loc[disputes["payment_id"], "fraud_pattern"].to_numpy()
    reason = disputes["reason"].to_numpy()
    assert set(pattern[reason == DisputeReason.FRAUD]) <= FRAUD_ONLY
    assert set(pattern[reason == DisputeReason.FRIENDLY_FRAUD]) <= {FraudPattern.FRIENDLY_FRAUD.value}
    assert set(pattern[reason == DisputeReason.NOT_AS_DESCRIBED]) <= {FraudPattern.NONE.value}
    assert set(pay["fraud_pattern"]) <= {FraudPattern.NONE.value} | {p.value for p in SIX_PATTERNS}

    # consent receipts: known purposes and statuses, after signup, never for guests
    assert set(consent["purpose"]) <= {ConsentPurpose.PERSONALISATION, ConsentPurpose.DEVICE_LOCATION_SIGNALS}
    assert set(consent["status"]) <= {s.value for s in ConsentStatus}
    assert (_t(consent["event_time"]) > signup.loc[consent["user_id"]].to_numpy()).all()
    guests = set(users.loc[users["is_guest"], "user_id"])
    assert not guests & set(consent["user_id"])
    assert set(consent["source"]) <= {"signup_form", "settings_page", "banner"}
    first = consent.groupby(["user_id", "purpose"], sort=False)["status"].first()
    assert set(first) <= {"given", "refused"}  # the first receipt is the choice at signup

    # creators who are also buyers, items after their creator joined
    linked = creators.dropna(subset=["user_id"])
    assert set(linked["user_id"]) <= set(signup.index)
    assert (_t(linked["joined_time"]) > signup.loc[linked["user_id"]].to_numpy()).all()
    joined = pd.Series(_t(creators["joined_time"]), index=creators["creator_id"])
    assert (_t(items["created_time"]) > joined.loc[items["creator_id"]].to_numpy()).all()


@SMALL
@given(cfg=configs)
def test_small_marketplaces_are_consistent(
    tmp_path_factory: pytest.TempPathFactory, cfg: SimulationConfig
) -> None:
    out = tmp_path_factory.mktemp("sim")
    summary, tables = _simulate(out, cfg)
    _check_consistency(tables, cfg)
    for name, model in TABLES.items():  # schemas validate (files were written through the same checks)
        at = pq.read_table(out / f"{name}.parquet")
        assert at.schema.remove_metadata().equals(arrow_schema(model)), name
        validate(at, model)
        assert summary["rows"][name] == at.num_rows  # type: ignore[index]
    truth = pd.read_parquet(out / TRUTH_DIR / USERS_TRUTH)
    assert set(truth["user_id"]) == set(tables["users"]["user_id"])


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs)
def test_same_seed_same_bytes(tmp_path_factory: pytest.TempPathFactory, cfg: SimulationConfig) -> None:
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    simulate_to_dir(cfg, a)
    simulate_to_dir(cfg, b)
    files = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert len(files) == len(TABLES) + 1
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_another_seed_gives_another_marketplace(tmp_path: Path) -> None:
    simulate_to_dir(SimulationConfig(users=60, days=5, seed=1), tmp_path / "a")
    simulate_to_dir(SimulationConfig(users=60, days=5, seed=2), tmp_path / "b")
    assert (tmp_path / "a/payments.parquet").read_bytes() != (tmp_path / "b/payments.parquet").read_bytes()


@pytest.mark.parametrize(
    ("field", "value"), [("users", 5), ("days", 0), ("seed", -1), ("fraud_rate", 0.5), ("history_days", 3)]
)
def test_bad_config_is_a_clear_error(field: str, value: int) -> None:
    with pytest.raises(SimulationError, match=field):
        SimulationConfig(**{field: value})  # type: ignore[arg-type]


def test_cli_prints_a_json_summary(tmp_path: Path) -> None:
    from serving.cli import app

    result = CliRunner().invoke(
        app, ["data", "simulate", "--users", "50", "--days", "5", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"]["users"] >= 50
    assert summary["rows"]["payments"] == pq.read_metadata(tmp_path / "payments.parquet").num_rows
    assert set(summary["payments_by_pattern"]) == {"none"} | {p.value for p in SIX_PATTERNS}
    assert (tmp_path / TRUTH_DIR / USERS_TRUTH).exists()
    assert summary["truth"] == f"{TRUTH_DIR}/{USERS_TRUTH}"


# --- a medium marketplace: the planted behaviour is really there --------------------------------
MEDIUM = SimulationConfig(users=1500, days=30, seed=11)


@pytest.fixture(scope="module")
def medium(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, object], dict[str, pd.DataFrame], Path]:
    out = tmp_path_factory.mktemp("medium")
    summary, tables = _simulate(out, MEDIUM)
    return summary, tables, out


def test_medium_is_consistent(medium: tuple[dict[str, object], dict[str, pd.DataFrame], Path]) -> None:
    _check_consistency(medium[1], MEDIUM)


def test_fraud_rate_and_every_pattern(
    medium: tuple[dict[str, object], dict[str, pd.DataFrame], Path],
) -> None:
    summary, t, _ = medium
    pay = t["payments"]
    rate = (pay["fraud_pattern"] != "none").mean()
    assert 0.005 <= rate <= 0.02
    assert summary["fraud_rate"] == pytest.approx(rate, abs=1e-4)
    counts = pay["fraud_pattern"].value_counts()
    for p in SIX_PATTERNS:
        assert counts.get(p.value, 0) > 0, p


def test_fraud_patterns_look_like_their_description(
    medium: tuple[dict[str, object], dict[str, pd.DataFrame], Path],
) -> None:
    _, t, out = medium
    pay, users = t["payments"], t["users"].set_index("user_id")
    legit = pay[pay["fraud_pattern"] == "none"]
    # card testing: small amounts, bursts of several payments from one device within an hour
    ct = pay[pay["fraud_pattern"] == "card_testing"]
    assert ct["amount"].max() <= 3.0
    burst = ct.groupby("device_id")["payment_time"].agg(["count", "min", "max"])
    assert (burst["count"] >= 4).all() and ((burst["max"] - burst["min"]) < pd.Timedelta(hours=2)).all()
    assert users.loc[ct["user_id"], "is_guest"].all()
    # stolen card: issuing country differs from the IP's, high amounts, device never seen before
    sc = pay[pay["fraud_pattern"] == "stolen_card"]
    assert (sc["card_bin_country"] != sc["ip_country"]).all()
    assert sc["amount"].median() > 2 * legit["amount"].median()
    # account takeover: an established account, a device and country it never used before
    ato = pay[pay["fraud_pattern"] == "account_takeover"]
    own_devices = set(zip(legit["user_id"], legit["device_id"], strict=True))
    assert not any((u, d) in own_devices for u, d in zip(ato["user_id"], ato["device_id"], strict=True))
    assert (ato["ip_country"].to_numpy() != users.loc[ato["user_id"], "country"].to_numpy()).all()
    tenure = _t(ato["payment_time"]) - _t(users.loc[ato["user_id"], "signup_time"])
    assert (tenure > np.timedelta64(21, "D")).all()
    # rings: devices shared by several accounts
    ring = pay[pay["fraud_pattern"] == "ring"]
    truth = pd.read_parquet(out / TRUTH_DIR / USERS_TRUTH).set_index("user_id")
    assert (truth.loc[ring["user_id"], "fraud_role"] == "ring").all()
    assert truth.loc[truth["fraud_role"] == "ring"].groupby("ring_id").size().min() >= 3
    # collusion: the same few buyers buy the same creator again and again
    col = pay[pay["fraud_pattern"] == "collusion"]
    assert col.groupby("creator_id")["user_id"].nunique().max() <= 5
    # friendly fraud: looks like the buyer's usual purchases (own device) and is always disputed
    ff = pay[pay["fraud_pattern"] == "friendly_fraud"]
    assert (ff["card_bin_country"].notna()).all()
    disputed = set(t["disputes"]["payment_id"])
    assert set(ff["payment_id"]) <= disputed


def test_labels_arrive_late(medium: tuple[dict[str, object], dict[str, pd.DataFrame], Path]) -> None:
    summary, t, _ = medium
    pay, disputes = t["payments"].set_index("payment_id"), t["disputes"]
    fraud = pay[pay["fraud_pattern"] != "none"]
    share = fraud.index.isin(disputes["payment_id"]).mean()
    assert 0.8 <= share <= 1.0
    delay = (
        _t(disputes["reported_time"]) - _t(pay.loc[disputes["payment_id"], "payment_time"])
    ) / np.timedelta64(1, "D")
    delay = pd.Series(delay)
    assert 14 <= delay.median() <= 42
    assert delay.max() <= MAX_DISPUTE_DAYS
    end = pd.Timestamp(MEDIUM.start) + pd.Timedelta(days=MEDIUM.days)
    assert summary["disputes"]["reported_after_end"] == (disputes["reported_time"] >= end).sum()  # type: ignore[index]
    assert summary["disputes"]["reported_after_end"] > 0  # type: ignore[index]


def test_marketplace_behaves_like_one(
    medium: tuple[dict[str, object], dict[str, pd.DataFrame], Path],
) -> None:
    _, t, _ = medium
    inter, items, creators, users = t["interactions"], t["items"], t["creators"], t["users"]
    counts = inter["event_type"].value_counts()
    assert counts["view"] > counts["like"] > counts["add_to_cart"] > counts["purchase"] > 0
    views = inter.loc[inter["event_type"] == "view", "item_id"].value_counts()
    top = views.iloc[: max(1, len(views) // 10)].sum() / views.sum()
    assert top > 0.35  # heavy-tailed popularity
    hour = inter["event_time"].dt.hour
    assert hour.between(17, 21).sum() > 4 * hour.between(1, 5).sum()  # evening peak, quiet nights
    per_day = inter.groupby(inter["event_time"].dt.date).size()
    weekday = pd.to_datetime(per_day.index).dayofweek
    assert per_day[weekday >= 5].mean() > per_day[weekday <= 3].mean()  # busier weekends
    assert inter["session_id"].notna().all() and inter["device_id"].notna().all()
    assert inter.groupby("session_id")["user_id"].nunique().max() == 1
    start = pd.Timestamp(MEDIUM.start)
    new_items = set(items.loc[items["created_time"] >= start, "item_id"])
    assert new_items & set(inter["item_id"])  # new items arrive and get seen
    assert set(items["status"]) == {"active", "removed", "unavailable", "flagged"}
    assert creators["user_id"].notna().any()  # some creators also buy
    buyers = set(t["payments"]["user_id"])
    assert set(creators["user_id"].dropna()) & buyers
    # price sensitivity: what is bought is cheaper than what is viewed
    price = items.set_index("item_id")["price"]
    viewed = price.loc[inter.loc[inter["event_type"] == "view", "item_id"]].mean()
    legit = t["payments"][t["payments"]["fraud_pattern"] == "none"]
    bought = price.loc[legit["item_ids"].explode()].mean()
    assert bought < viewed
    assert users["country"].dropna().str.fullmatch(r"[A-Z]{2}").all()


def test_consent_and_minors(medium: tuple[dict[str, object], dict[str, pd.DataFrame], Path]) -> None:
    summary, t, out = medium
    consent, users = t["consent_events"], t["users"]
    assert {"given", "refused", "withdrawn", "renewed"} <= set(consent["status"])
    assert set(consent["policy_version"]) == {"2024-03-01", "2025-02-12"}
    assert {"EU"} < set(consent["jurisdiction"])
    # the state after the last receipt matches the summary; users without receipts are unknown
    last = consent.groupby(["purpose", "user_id"])["status"].last()
    for purpose, states in summary["users_by_consent_state"].items():  # type: ignore[attr-defined]
        observed = last.loc[purpose].value_counts()
        for status, n in states.items():
            expected = len(users) - len(last.loc[purpose]) if status == "unknown" else observed.get(status, 0)
            assert n == expected, (purpose, status)
        assert states["unknown"] > 0 and states["refused"] > 0
    # some declare an age under 18, a few more lied: their truth is outside the event model
    truth = pd.read_parquet(out / TRUTH_DIR / USERS_TRUTH).set_index("user_id")
    dob = pd.to_datetime(users.set_index("user_id")["date_of_birth"])
    declared_minor = dob > pd.Timestamp(MEDIUM.start).tz_localize(None) - pd.DateOffset(years=18)
    assert declared_minor.sum() > 0
    assert truth.loc[declared_minor[declared_minor].index, "true_minor"].all()
    hidden = truth["true_minor"] & ~declared_minor.reindex(truth.index, fill_value=False)
    assert hidden.sum() > 0
    assert summary["minors"] == {"declared": int(declared_minor.sum()), "hidden": int(hidden.sum())}
    assert "true_minor" not in users.columns
    assert users.loc[users["is_guest"], "date_of_birth"].isna().all()


def test_cli_bad_default_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from features.settings import get_settings
    from serving.cli import app

    monkeypatch.setenv("AIPIC_DEFAULT_USERS", "5")
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["data", "simulate", "--days", "2", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "users must be at least 10" in result.output
    assert not (tmp_path / "payments.parquet").exists()


def test_a_tiny_marketplace_with_quiet_days_simulates(tmp_path: Path) -> None:
    """10 buyers over 60 days leave days without a single view (once an IndexError)."""
    cfg = SimulationConfig(users=10, days=60, seed=7)
    summary, tables = _simulate(tmp_path, cfg)
    _check_consistency(tables, cfg)
    assert summary["rows"]["users"] >= 10  # type: ignore[index]
