"""The fraud-handbook benchmark: fold dates, known-compromised removal, handbook features,
seller-history features, and a small end-to-end run of the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.conftest import shared_file
from training.bench_fraud import (
    HANDBOOK_FEATURES,
    BenchError,
    assessment_mask,
    card_history_features,
    creator_history_features,
    fold_plan,
    handbook_features,
    train_mask,
)

T0 = pd.Timestamp("2018-08-01")


def test_test_folds_shift_back_seven_days() -> None:
    folds = fold_plan("2018-08-15", 4)
    assert [f.train_start for f in folds] == [
        pd.Timestamp(d) for d in ("2018-08-15", "2018-08-08", "2018-08-01", "2018-07-25")
    ]
    first, last = folds[0], folds[-1]
    assert first.describe() == {
        "train": "2018-08-15 .. 2018-08-21",
        "delay": "2018-08-22 .. 2018-08-28",
        "test": "2018-08-29 .. 2018-09-04",
    }
    # the README: test blocks between 2018-08-08 and 2018-09-04
    assert last.test_start == pd.Timestamp("2018-08-08")
    assert first.test_end == pd.Timestamp("2018-09-05")
    assert first.label_cutoff == first.test_start == pd.Timestamp("2018-08-29")
    valid = fold_plan("2018-07-11", 4)
    assert valid[0].describe()["test"] == "2018-07-25 .. 2018-07-31"
    assert valid[-1].train_start == pd.Timestamp("2018-06-20")
    with pytest.raises(BenchError):
        fold_plan("2018-08-15", 0)


def _frame(rows: list[tuple[str, float, int]]) -> pd.DataFrame:
    """rows of (card, day offset from T0, fraud)."""
    df = pd.DataFrame(rows, columns=["card", "day", "fraud"])
    df["time"] = T0 + pd.to_timedelta(df["day"], unit="D")
    return df


def test_known_compromised_cards_are_removed_per_test_day() -> None:
    fold = fold_plan(T0.date(), 1)[0]  # train days 0-6, delay 7-13, test 14-20
    df = _frame(
        [
            ("X", 2.5, 1),  # fraud in training: known on every test day
            ("X", 14.5, 0),
            ("X", 20.5, 0),
            ("Y", 9.5, 1),  # fraud on delay day 9: known from test day 17 (= 9 + 8)
            ("Y", 16.5, 0),
            ("Y", 17.5, 0),
            ("Z", -3.0, 1),  # fraud before the training start: does not count
            ("Z", 15.5, 0),
            ("W", 15.5, 1),  # fraud on a test day: known only from day 23, after the test
            ("W", 19.5, 1),
            ("V", 13.9, 1),  # fraud on the last delay day: known from day 21, after the test
            ("V", 20.9, 0),
            ("U", 21.5, 0),  # after the test window
        ]
    )
    kept = assessment_mask(df["time"], df["card"], df["fraud"], fold)
    got = sorted(zip(df.loc[kept, "card"], df.loc[kept, "day"], strict=True))
    assert got == [("V", 20.9), ("W", 15.5), ("W", 19.5), ("Y", 16.5), ("Z", 15.5)]
    training = train_mask(df["time"], fold)
    assert list(df.loc[training, "day"]) == [2.5]


def test_handbook_features_by_hand() -> None:
    df = pd.DataFrame(
        {
            "time": T0 + pd.to_timedelta([0, 6, 30, 24 * 8 + 12], unit="h"),
            "card": ["c1", "c1", "c1", "c2"],
            "terminal": ["t1", "t2", "t1", "t1"],
            "amount": [10.0, 20.0, 30.0, 40.0],
            "fraud": [1, 0, 0, 0],
        }
    )
    f = handbook_features(df["time"], df["card"], df["terminal"], df["amount"], df["fraud"])
    assert list(f.columns) == HANDBOOK_FEATURES
    # card windows include the current payment: (t - 1 day, t]; the 06:00 payment is exactly
    # one day before the 30 h one, so outside its window
    assert list(f["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]) == [1, 2, 1, 1]
    assert list(f["CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW"]) == [10, 15, 30, 40]
    assert list(f["CUSTOMER_ID_NB_TX_7DAY_WINDOW"]) == [1, 2, 3, 1]
    # terminal t1 at day 8.5: 1-day window lagged by 7 days = (day 0.5, day 1.5] -> the day-1.25
    # payment (legitimate); 7-day window (day -5.5, day 1.5] -> day 0 (fraud) and day 1.25
    assert f["TERMINAL_ID_NB_TX_1DAY_WINDOW"].iloc[3] == 1
    assert f["TERMINAL_ID_RISK_1DAY_WINDOW"].iloc[3] == 0
    assert f["TERMINAL_ID_NB_TX_7DAY_WINDOW"].iloc[3] == 2
    assert f["TERMINAL_ID_RISK_7DAY_WINDOW"].iloc[3] == 0.5
    # nothing is known yet for the first payments: count 0, risk 0 (the handbook's fill)
    assert f["TERMINAL_ID_NB_TX_30DAY_WINDOW"].iloc[0] == 0
    assert f["TERMINAL_ID_RISK_30DAY_WINDOW"].iloc[0] == 0
    assert list(f["TX_DURING_NIGHT"]) == [1, 1, 1, 0]  # 00:00, 06:00, 06:00 next day, 12:00
    assert list(f["TX_DURING_WEEKEND"]) == [0, 0, 0, 0]  # Wednesday, Wednesday, Thursday, Thursday
    saturday = pd.Series([pd.Timestamp("2018-08-04 13:00")])
    one = handbook_features(saturday, pd.Series(["c"]), pd.Series(["t"]), pd.Series([5.0]), pd.Series([0]))
    assert one["TX_DURING_WEEKEND"].iloc[0] == 1 and one["TX_DURING_NIGHT"].iloc[0] == 0


def test_seller_history_uses_only_matured_sales_and_timely_disputes() -> None:
    rows = [
        # creator, sale day, dispute reported day (None = no dispute)
        ("s1", 0.0, 7.0),
        ("s1", 1.0, 8.0),
        ("s1", 2.0, None),
        ("s1", 3.0, 30.0),  # reported after the 7-day delay: never counts as disputed here
        ("s1", 8.5, None),
        ("s1", 9.5, None),
        ("s2", 9.5, None),  # a seller without history
    ]
    frame = pd.DataFrame(rows, columns=["creator", "day", "reported"])
    time = T0 + pd.to_timedelta(frame["day"], unit="D")
    reported = T0 + pd.to_timedelta(frame["reported"].astype(float), unit="D")
    f = creator_history_features(time, frame["creator"], reported)
    at_8_5, at_9_5, new_seller = f.iloc[4], f.iloc[5], f.iloc[6]
    # at day 8.5 the matured sales (<= day 1.5) are days 0 and 1, both disputed in time
    assert at_8_5["creator_matured_last_disputed"] == 1
    assert at_8_5["creator_matured_disputed_run"] == 2
    assert at_8_5["creator_days_since_disputed_run_start"] == pytest.approx(8.5)
    # at day 9.5 the matured sales are days 0, 1, 2: the last one is clean, the run is over
    assert at_9_5["creator_matured_last_disputed"] == 0
    assert at_9_5["creator_matured_disputed_run"] == 0
    assert np.isnan(at_9_5["creator_days_since_disputed_run_start"])
    assert at_9_5["creator_matured_dispute_share_last5"] == pytest.approx(2 / 3)
    assert at_9_5["creator_lag7d_payments_1d"] == 1  # (day 1.5, day 2.5]: the day-2 sale
    assert at_9_5["creator_lag7d_dispute_share_1d"] == 0
    assert at_9_5["creator_lag7d_payments_7d"] == 3
    assert at_9_5["creator_lag7d_dispute_share_7d"] == pytest.approx(2 / 3)
    assert at_9_5["creator_days_since_first_recent_disputed_sale"] == pytest.approx(9.5)
    # nothing matured yet for the first sale, and nothing at all for a new seller
    assert np.isnan(f.iloc[0]["creator_matured_last_disputed"])
    assert np.isnan(new_seller["creator_matured_disputed_run"])
    assert new_seller["creator_lag7d_payments_30d"] == 0
    assert new_seller["creator_lag7d_dispute_share_30d"] == 0


def test_card_baseline_ignores_the_last_two_weeks() -> None:
    days = [0.0, 10.0, 20.0, 40.0, 41.0]
    amounts = [10.0, 30.0, 500.0, 20.0, 100.0]
    time = T0 + pd.to_timedelta(pd.Series(days), unit="D")
    card = pd.Series(["c"] * 5)
    amount = pd.Series(amounts)
    f = card_history_features(time, card, amount, amount, amount * 2)
    # day 41: baseline window (day -19, day 27] -> 10, 30, 500 (day 40 is too recent)
    mean = np.mean([10.0, 30.0, 500.0])
    assert f["card_payments_baseline"].iloc[4] == 3
    assert f["card_amount_ratio_baseline"].iloc[4] == pytest.approx(100.0 / mean)
    assert f["card_amount_zscore_baseline"].iloc[4] == pytest.approx(
        (100.0 - mean) / np.std([10.0, 30.0, 500.0])
    )
    # day 10: baseline (day -50, day -4] is empty
    assert f["card_payments_baseline"].iloc[1] == 0
    assert np.isnan(f["card_amount_ratio_baseline"].iloc[1])
    assert f["card_amount_ratio_mean_7d"].tolist() == [1.0] * 5
    assert f["card_amount_ratio_mean_30d"].tolist() == [0.5] * 5


def test_bench_command_end_to_end(tmp_path: Path) -> None:
    """A one-fold run on a subset of cards through the real importer, pipeline and models."""
    from serving.cli import app

    data = shared_file("fraud-handbook", "transactions.parquet")
    out = tmp_path / "bench.json"
    args = ["bench", "fraud-handbook", "--data", str(data), "--folds", "1", "--max-cards", "400"]
    args += ["--speed-rows", "20000", "--threads", "1", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "aipic beats every published row on" in result.output
    doc = json.loads(out.read_text())
    for model in ("aipic", "logistic_regression", "random_forest"):
        for metric in ("auc_roc", "average_precision", "card_precision_at_100"):
            assert 0.0 <= doc[model][metric] <= 1.0
    assert doc["aipic"]["auc_roc"] > 0.6  # it learned something on 400 cards
    assert set(doc["published"]) >= {"Logistic regression", "Balanced bagging"}
    (fold,) = doc["per_fold"]
    assert fold["train"] == "2018-08-15 .. 2018-08-21" and fold["test"] == "2018-08-29 .. 2018-09-04"
    assert fold["test_frauds"] > 0 and fold["train_frauds_known"] > 0
    assert doc["speed"]["rows"] == 20000 and doc["training_seconds"] > 0 and doc["peak_rss_mb"] > 0
    assert "creator_matured_disputed_run" in doc["aipic_features"]
    assert "card_amount_mean_30d" in doc["aipic_features"]  # from the project's pipeline


def test_bench_command_rejects_bad_input(tmp_path: Path) -> None:
    from serving.cli import app

    missing = CliRunner().invoke(app, ["bench", "fraud-handbook", "--data", str(tmp_path / "nope.parquet")])
    assert missing.exit_code == 2
    assert "file not found" in missing.output
    assert "Traceback" not in missing.output
    bad_date = CliRunner().invoke(app, ["bench", "fraud-handbook", "--train-start", "15/08/2018"])
    assert bad_date.exit_code == 2
    assert "not a date" in bad_date.output
