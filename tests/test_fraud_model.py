"""Fraud metrics on hand-computed cases and the FraudModel contract (fit, calibrate, score_row)."""

from __future__ import annotations

from dataclasses import replace

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from models.fraud import (
    FraudModel,
    FraudModelError,
    FraudParams,
    IsotonicCalibrator,
    PlattCalibrator,
    calibrator_from_dict,
)
from models.metrics import (
    MetricError,
    auc_roc,
    average_precision,
    calibration_error,
    card_precision_at_k,
    fraud_metrics,
    recall_at_fpr,
    recall_per_pattern,
)

# --------------------------------------------------------------------------- metrics


def test_auc_and_average_precision_by_hand() -> None:
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert auc_roc(y, s) == pytest.approx(0.75)
    # ranked: 0.8 (fraud) 0.4 0.35 (fraud) 0.1 -> precision 1 at recall .5, 2/3 at recall 1
    assert average_precision(y, s) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


def test_single_class_is_an_error_not_a_number() -> None:
    with pytest.raises(MetricError, match="both classes"):
        auc_roc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(MetricError, match="differ in length"):
        average_precision([0, 1], [0.1])


def test_recall_at_one_percent_fpr() -> None:
    # 200 legitimate scores 0..199, 10 frauds: 4 above every legitimate one, 6 in the middle.
    legit = np.arange(200, dtype=float)
    fraud = np.array([500, 400, 300, 250, 100, 90, 80, 70, 60, 50], dtype=float)
    y = np.r_[np.zeros(200), np.ones(10)]
    s = np.r_[legit, fraud]
    # 1 % of 200 = 2 false positives allowed: threshold 198 catches the 4 top frauds only
    assert recall_at_fpr(y, s, 0.01) == pytest.approx(0.4)
    # 100 false positives allowed: threshold 100 catches 500, 400, 300, 250, 100
    assert recall_at_fpr(y, s, 0.5) == pytest.approx(0.5)
    assert recall_at_fpr(y, s, 0.75) == pytest.approx(1.0)  # 150: down to 50


def test_calibration_error_by_hand() -> None:
    assert calibration_error([0, 0, 1, 1], [0.1, 0.1, 0.9, 0.9]) == pytest.approx(0.1)
    assert calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)
    with pytest.raises(MetricError, match=r"\[0, 1\]"):
        calibration_error([0, 1], [0.5, 1.5])


def test_recall_per_pattern_ignores_legitimate_rows() -> None:
    patterns = ["none", "card", "card", "terminal", "none", "card"]
    flagged = [True, True, False, True, False, True]
    assert recall_per_pattern(patterns, flagged) == {"card": pytest.approx(2 / 3), "terminal": 1.0}


def test_card_precision_known_case_with_and_without_removal() -> None:
    frame = pd.DataFrame(
        [
            # day, card, fraud, score
            (0, "A", 1, 0.90),
            (0, "A", 0, 0.20),  # the card's max score and max label count
            (0, "B", 0, 0.80),
            (0, "C", 1, 0.70),
            (1, "A", 1, 0.95),  # caught on day 0: removed on day 1
            (1, "C", 1, 0.60),
            (1, "D", 0, 0.50),
        ],
        columns=["day", "card", "y", "s"],
    )
    cp = card_precision_at_k(frame["day"], frame["card"], frame["y"], frame["s"], k=2)
    # day 0: top 2 = A (fraud), B -> 1/2; day 1 without A: C (fraud), D -> 1/2
    assert cp.per_day == [0.5, 0.5]
    assert cp.compromised_cards_per_day == [2, 1]
    assert cp.mean == pytest.approx(0.5)
    no_removal = card_precision_at_k(
        frame["day"], frame["card"], frame["y"], frame["s"], k=2, remove_detected=False
    )
    assert no_removal.per_day == [0.5, 1.0]  # day 1: A and C both fraud
    # k larger than the number of cards: the denominator stays k (handbook definition); every
    # compromised card is caught on day 0, so day 1 only has D left
    wide = card_precision_at_k(frame["day"], frame["card"], frame["y"], frame["s"], k=100)
    assert wide.per_day == [0.02, 0.0]


def test_card_precision_not_caught_card_stays() -> None:
    # C is fraud on day 0 but outside the top 1: it is not "caught" and stays on day 1
    frame = pd.DataFrame(
        [(0, "A", 1, 0.9), (0, "C", 1, 0.1), (1, "C", 1, 0.8), (1, "D", 0, 0.7)],
        columns=["day", "card", "y", "s"],
    )
    cp = card_precision_at_k(frame["day"], frame["card"], frame["y"], frame["s"], k=1)
    assert cp.per_day == [1.0, 1.0]


def test_fraud_metrics_bundle_has_card_precision_with_cards() -> None:
    y = np.array([0, 1, 0, 1, 0, 0])
    s = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.4])
    out = fraud_metrics(y, s, day=np.zeros(6, dtype=int), card=np.arange(6), k=2)
    assert out["auc_roc"] == pytest.approx(1.0)
    assert out["card_precision_at_2"] == pytest.approx(1.0)
    assert "card_precision_at_100" not in fraud_metrics(y, s)


# --------------------------------------------------------------------------- model


def _synthetic(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Fraud depends on two of four features; about 5 % fraud."""
    rng = np.random.default_rng(seed)
    x = pd.DataFrame(rng.normal(size=(n, 4)), columns=["amount_ratio", "velocity", "noise_a", "noise_b"])
    logit = -4.0 + 2.0 * x["amount_ratio"] + 1.5 * (x["velocity"] > 1)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int).to_numpy()
    return x, y


FAST = FraudParams(num_boost_round=150, early_stopping_rounds=20, num_threads=1, learning_rate=0.1)


@pytest.fixture(scope="module")
def fitted() -> tuple[FraudModel, pd.DataFrame, np.ndarray]:
    x, y = _synthetic(9000, 1)
    model = FraudModel(FAST).fit(x[:6000], y[:6000], x[6000:7500], y[6000:7500], x[7500:], y[7500:])
    test_x, test_y = _synthetic(3000, 2)
    return model, test_x, test_y


def test_fit_predict_contract(fitted: tuple[FraudModel, pd.DataFrame, np.ndarray]) -> None:
    model, x, y = fitted
    proba = model.predict_proba(x)
    assert proba.shape == (len(x), 2)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert ((proba >= 0) & (proba <= 1)).all()
    assert list(model.classes_) == [0, 1]
    assert set(np.unique(model.predict(x))) <= {0, 1}
    assert model.feature_names_ == ["amount_ratio", "velocity", "noise_a", "noise_b"]
    assert 1 <= model.best_iteration_ <= FAST.num_boost_round
    assert auc_roc(y, proba[:, 1]) > 0.8  # it learned the planted signal
    report = model.fit_report_
    assert report.train_rows == 6000 and report.calib_rows == 1500
    assert report.pos_weight == pytest.approx(np.sqrt((6000 - report.train_frauds) / report.train_frauds))
    # scikit-learn contract: parameters round-trip through clone
    assert clone(model).get_params()["params"] == FAST
    importance = model.feature_importance()
    assert importance["amount_ratio"] > importance["noise_a"]


def test_columns_are_taken_by_name(fitted: tuple[FraudModel, pd.DataFrame, np.ndarray]) -> None:
    model, x, _ = fitted
    shuffled = x[["noise_b", "velocity", "amount_ratio", "noise_a"]]
    assert np.array_equal(model.predict_proba(shuffled), model.predict_proba(x))
    with pytest.raises(FraudModelError, match="missing feature columns"):
        model.predict_proba(x.drop(columns=["velocity"]))


@pytest.mark.parametrize("kind", ["platt", "isotonic"])
def test_calibrated_probabilities_in_unit_interval_and_monotone(kind: str) -> None:
    x, y = _synthetic(8000, 3)
    model = FraudModel(replace(FAST, calibration=kind))
    model.fit(x[:5000], y[:5000], x[5000:6500], y[5000:6500], x[6500:], y[6500:])
    test_x, _ = _synthetic(4000, 4)
    raw = model.raw_score(test_x)
    prob = model.predict_proba(test_x)[:, 1]
    assert ((prob >= 0) & (prob <= 1)).all()
    order = np.argsort(raw, kind="stable")
    assert (np.diff(prob[order]) >= -1e-12).all()  # never decreases as the raw score grows
    if kind == "platt":
        assert (np.diff(prob[order])[np.diff(raw[order]) > 0] > 0).all()  # strictly: keeps the ranking
    extreme = model.calibrator_(np.array([-50.0, 50.0]))
    assert 0 <= extreme[0] <= extreme[1] <= 1


def test_score_row_equals_batch_predict(fitted: tuple[FraudModel, pd.DataFrame, np.ndarray]) -> None:
    model, x, _ = fitted
    batch = model.predict_proba(x.iloc[:25])[:, 1]
    rows = [model.score_row(x.iloc[i].to_numpy()) for i in range(25)]
    assert np.allclose(rows, batch, rtol=0, atol=1e-12)
    with pytest.raises(FraudModelError, match="expected 4 features"):
        model.score_row(np.zeros(3))


def test_rebuilt_from_stored_parts_scores_the_same(
    fitted: tuple[FraudModel, pd.DataFrame, np.ndarray],
) -> None:
    model, x, _ = fitted
    booster = lgb.Booster(model_str=model.booster_.model_to_string(num_iteration=model.best_iteration_))
    again = FraudModel.from_parts(booster, model.calibrator_.to_dict())
    assert again.feature_names_ == model.feature_names_
    assert np.allclose(again.predict_proba(x)[:, 1], model.predict_proba(x)[:, 1], atol=1e-12)


def test_calibrator_serialisation_round_trip() -> None:
    platt = PlattCalibrator(slope=1.3, intercept=-2.0)
    iso = IsotonicCalibrator(x=(-1.0, 0.0, 2.0), y=(0.0, 0.2, 0.9))
    raw = np.linspace(-3, 3, 13)
    for cal in (platt, iso):
        assert np.array_equal(calibrator_from_dict(cal.to_dict())(raw), cal(raw))
    with pytest.raises(FraudModelError, match="unknown calibrator"):
        calibrator_from_dict({"kind": "magic"})


def test_fit_refuses_slices_without_fraud() -> None:
    x, y = _synthetic(3000, 5)
    with pytest.raises(FraudModelError, match="early-stopping slice has no fraud"):
        FraudModel(FAST).fit(x[:2000], y[:2000], x[2000:], np.zeros(1000, dtype=int))
    with pytest.raises(FraudModelError, match="both classes"):
        FraudModel(FAST).fit(x[:2000], np.zeros(2000, dtype=int), x[2000:], y[2000:])
    with pytest.raises(FraudModelError, match="not fitted"):
        FraudModel(FAST).predict_proba(x)
    with pytest.raises(FraudModelError, match="0 or 1"):
        FraudModel(FAST).fit(x[:2000], y[:2000] * 2, x[2000:], y[2000:])


def test_refit_on_valid_learns_from_the_later_slice_too() -> None:
    x, y = _synthetic(9000, 6)
    model = FraudModel(replace(FAST, refit_on_valid=True)).fit(x[:6000], y[:6000], x[6000:7500], y[6000:7500])
    report = model.fit_report_
    # rounds found by early stopping, scaled to the 7500 rows the refit booster learns from
    assert report.refit_rounds == max(1, round(report.best_iteration * 7500 / 6000))
    assert model.best_iteration_ == report.refit_rounds == model.booster_.current_iteration()
    test_x, test_y = _synthetic(3000, 7)
    prob = model.predict_proba(test_x)[:, 1]
    assert ((prob >= 0) & (prob <= 1)).all()
    assert auc_roc(test_y, prob) > 0.8
    assert model.score_row(test_x.iloc[3].to_numpy()) == pytest.approx(prob[3], abs=1e-12)
