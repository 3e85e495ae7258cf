"""The fraud model: a LightGBM binary booster with a calibrator fit on a later time slice.

Why not `lightgbm.LGBMClassifier`: the project needs early stopping on a *later* time slice,
a calibrator fit on data the booster never saw, and a one-row scoring path that calls the
Booster directly on a NumPy row with one thread (field notes: the scikit-learn wrapper is
20-50x slower for one row and default threading gives p99 spikes). The class still follows the
scikit-learn estimator contract (``get_params``, ``fit`` returning self, ``predict_proba`` with
one column per class, ``classes_``) so sklearn tooling and baselines can sit beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

Matrix = pd.DataFrame | npt.NDArray[np.floating[Any]]


class FraudModelError(ValueError):
    """The model cannot be fit or used as asked (no fraud to learn from, missing features, ...)."""


# Defaults picked on the handbook's VALIDATION folds (training start 2018-07-11, 4 folds), never
# on its test folds: see `training/bench_fraud.py` (`tune_on_validation`) and the report.
@dataclass(frozen=True)
class FraudParams:
    """Hyper-parameters of the booster, the imbalance handling and the calibration."""

    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 40
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    lambda_l2: float = 10.0
    min_gain_to_split: float = 0.0
    max_bin: int = 255
    num_boost_round: int = 1000
    early_stopping_rounds: int = 100
    # Class imbalance: frauds are weighted by `pos_weight`; None means sqrt(negatives / positives),
    # a middle ground between no weighting (too few frauds seen) and full balancing (noisy).
    pos_weight: float | None = None
    early_stopping_metric: Literal["average_precision", "auc", "binary_logloss"] = "average_precision"
    calibration: Literal["platt", "isotonic"] = "platt"
    # After early stopping, retrain on train + valid with the rounds scaled to the larger data,
    # so the most recent days (the early-stopping slice) are learned from too.
    refit_on_valid: bool = False
    # (feature name, +1 / -1) pairs: the score may only rise (+1) or fall (-1) with that input,
    # e.g. every input that grows with the payment's amount is +1 (features.definitions.monotone).
    monotone: tuple[tuple[str, int], ...] = ()
    num_threads: int = 0  # 0 = LightGBM's default (all cores) for training and batch scoring
    seed: int = 7

    def lgb_params(self, pos_weight: float, names: Sequence[str] = ()) -> dict[str, Any]:
        """The parameter dict handed to `lightgbm.train` (``names``: the feature order)."""
        return {
            **self._monotone_params(names),
            "objective": "binary",
            "metric": self.early_stopping_metric,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": self.bagging_freq,
            "lambda_l2": self.lambda_l2,
            "min_gain_to_split": self.min_gain_to_split,
            "max_bin": self.max_bin,
            "scale_pos_weight": pos_weight,
            "num_threads": self.num_threads,
            "seed": self.seed,
            "deterministic": True,
            "force_col_wise": True,
            "verbosity": -1,
        }

    def _monotone_params(self, names: Sequence[str]) -> dict[str, Any]:
        wanted = dict(self.monotone)
        if not wanted:
            return {}
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise FraudModelError(f"monotone constraints on features the model does not use: {unknown[:5]}")
        return {
            "monotone_constraints": [int(wanted.get(n, 0)) for n in names],
            "monotone_constraints_method": "advanced",
        }


class Calibrator(Protocol):
    """Maps the booster's raw score (log-odds) to a probability, monotonically."""

    @property
    def kind(self) -> str: ...

    def __call__(self, raw: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class PlattCalibrator:
    """sigmoid(slope * raw + intercept) with slope > 0: strictly increasing, keeps the ranking."""

    slope: float
    intercept: float
    kind: str = "platt"

    def __call__(self, raw: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        z = self.slope * np.asarray(raw, dtype=np.float64) + self.intercept
        return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)))  # = 1 / (1 + exp(-z)), no overflow

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "slope": self.slope, "intercept": self.intercept}


@dataclass(frozen=True)
class IsotonicCalibrator:
    """Piecewise-linear non-decreasing map through isotonic-regression knots (clipped at the ends)."""

    x: tuple[float, ...]
    y: tuple[float, ...]
    kind: str = "isotonic"

    def __call__(self, raw: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.interp(np.asarray(raw, dtype=np.float64), self.x, self.y)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "x": list(self.x), "y": list(self.y)}


def fit_calibrator(kind: str, raw: npt.ArrayLike, y: npt.ArrayLike) -> Calibrator:
    """Fit a calibrator on raw scores of a slice the booster was not trained on."""
    r = np.asarray(raw, dtype=np.float64).ravel()
    t = np.asarray(y).astype(np.int8).ravel()
    positives = int(t.sum())
    if positives == 0 or positives == t.size:
        raise FraudModelError(
            f"calibration slice needs both frauds and legitimate payments; got {positives} of {t.size}"
        )
    if kind == "platt":
        lr = LogisticRegression(C=1e6, max_iter=1000)
        lr.fit(r.reshape(-1, 1), t)
        slope = float(lr.coef_[0, 0])
        if not slope > 0:
            raise FraudModelError(
                "calibration found scores anti-correlated with fraud on the later slice (Platt slope "
                f"{slope:.3g}); the model is not usable"
            )
        return PlattCalibrator(slope=slope, intercept=float(lr.intercept_[0]))
    if kind == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(r, t)
        return IsotonicCalibrator(
            x=tuple(float(v) for v in iso.X_thresholds_), y=tuple(float(v) for v in iso.y_thresholds_)
        )
    raise FraudModelError(f"unknown calibration {kind!r}; use 'platt' or 'isotonic'")


def calibrator_from_dict(data: dict[str, Any]) -> Calibrator:
    """Rebuild a calibrator stored with the model (e.g. as an MLflow artifact)."""
    if data.get("kind") == "platt":
        return PlattCalibrator(slope=float(data["slope"]), intercept=float(data["intercept"]))
    if data.get("kind") == "isotonic":
        return IsotonicCalibrator(x=tuple(data["x"]), y=tuple(data["y"]))
    raise FraudModelError(f"unknown calibrator {data.get('kind')!r}")


@dataclass
class FitReport:
    """What happened during `fit`, for logging (MLflow) and the benchmark output."""

    best_iteration: int
    pos_weight: float
    train_rows: int
    train_frauds: int
    valid_rows: int
    valid_frauds: int
    calib_rows: int
    valid_score: dict[str, float] = field(default_factory=dict)
    refit_rounds: int = 0  # rounds of the booster refit on train + valid (0 = no refit)


class FraudModel(ClassifierMixin, BaseEstimator):
    """LightGBM fraud classifier with time-ordered early stopping and calibration.

    ``fit(X_train, y_train, X_valid, y_valid)``: the booster learns on the train slice and stops
    when the metric stops improving on the valid slice, which must be *later* in time. The
    calibrator is fit on ``X_calib``/``y_calib`` when given (a slice later than training), else
    on the valid slice. ``predict_proba`` returns calibrated probabilities; ``raw_score``
    returns the booster's log-odds (for ranking metrics, explanations).
    """

    def __init__(self, params: FraudParams | None = None) -> None:
        self.params = params

    # scikit-learn contract -----------------------------------------------------------------
    @property
    def classes_(self) -> npt.NDArray[np.int64]:
        return np.array([0, 1])

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "booster_")

    @property
    def resolved_params(self) -> FraudParams:
        return self.params or FraudParams()

    def fit(
        self,
        X_train: Matrix,
        y_train: npt.ArrayLike,
        X_valid: Matrix,
        y_valid: npt.ArrayLike,
        X_calib: Matrix | None = None,
        y_calib: npt.ArrayLike | None = None,
        feature_names: Sequence[str] | None = None,
    ) -> FraudModel:
        """Train with early stopping on the later valid slice, then fit the calibrator."""
        p = self.resolved_params
        names = _feature_names(X_train, feature_names)
        xt, yt = _matrix(X_train, names), _labels(y_train, "train")
        xv, yv = _matrix(X_valid, names), _labels(y_valid, "valid")
        if xt.shape[0] != yt.size or xv.shape[0] != yv.size:
            raise FraudModelError("features and labels differ in length")
        pos, neg = int(yt.sum()), int(yt.size - yt.sum())
        if pos == 0 or neg == 0:
            raise FraudModelError(f"training slice needs both classes; got {pos} frauds of {yt.size}")
        if yv.sum() == 0:
            raise FraudModelError("the early-stopping slice has no fraud: choose a longer or later slice")
        pos_weight = p.pos_weight if p.pos_weight is not None else math.sqrt(neg / pos)
        train_set = lgb.Dataset(xt, label=yt, feature_name=list(names), free_raw_data=True)
        valid_set = lgb.Dataset(xv, label=yv, reference=train_set)
        booster = lgb.train(
            p.lgb_params(pos_weight, names),
            train_set,
            num_boost_round=p.num_boost_round,
            valid_sets=[valid_set],
            valid_names=["valid"],
            callbacks=[lgb.early_stopping(p.early_stopping_rounds, first_metric_only=True, verbose=False)],
        )
        best = int(booster.best_iteration) or booster.current_iteration()
        self.booster_ = booster
        self.best_iteration_ = best
        self.feature_names_ = list(names)
        if X_calib is not None and y_calib is not None:
            xc, yc = _matrix(X_calib, names), _labels(y_calib, "calibration")
        else:
            xc, yc = xv, yv
        # Calibrate on raw scores the calibrating booster has not been trained on: with a refit
        # and no separate calibration slice, the early-stopped booster's scores on the valid slice
        # stand in for the refit booster's (same objective, rounds scaled to the data).
        calib_raw = self.raw_score(xc)
        refit_rounds = 0
        if p.refit_on_valid:
            yall = np.concatenate([yt, yv])
            pos_all = int(yall.sum())
            refit_weight = (
                p.pos_weight if p.pos_weight is not None else math.sqrt((yall.size - pos_all) / pos_all)
            )
            refit_rounds = max(1, round(best * yall.size / yt.size))
            full = lgb.Dataset(np.vstack([xt, xv]), label=yall, feature_name=list(names), free_raw_data=True)
            refit_params = {k: v for k, v in p.lgb_params(refit_weight, names).items() if k != "metric"}
            self.booster_ = lgb.train(refit_params, full, num_boost_round=refit_rounds)
            self.best_iteration_ = refit_rounds
            if X_calib is not None and y_calib is not None:
                calib_raw = self.raw_score(xc)
        self.calibrator_ = fit_calibrator(p.calibration, calib_raw, yc)
        score = {k: float(v) for k, v in booster.best_score.get("valid", {}).items()}
        self.fit_report_ = FitReport(
            best, pos_weight, yt.size, pos, yv.size, int(yv.sum()), yc.size, score, refit_rounds
        )
        return self

    def raw_score(self, X: Matrix) -> npt.NDArray[np.float64]:
        """The booster's log-odds at the early-stopped iteration (monotone with the probability)."""
        self._check_fitted()
        x = _matrix(X, self.feature_names_)
        out = self.booster_.predict(x, num_iteration=self.best_iteration_, raw_score=True)
        return np.asarray(out, dtype=np.float64)

    def predict_proba(self, X: Matrix) -> npt.NDArray[np.float64]:
        """Calibrated probabilities, shape (n, 2): column 1 is P(fraud)."""
        raw = self.raw_score(X)  # checks the model is fitted
        p = self.calibrator_(raw)
        return np.column_stack([1.0 - p, p])

    def predict(self, X: Matrix, threshold: float = 0.5) -> npt.NDArray[np.int64]:
        """1 where the calibrated fraud probability reaches ``threshold``."""
        return (self.predict_proba(X)[:, 1] >= threshold).astype(np.int64)

    # serving path -------------------------------------------------------------------------
    def score_row(self, row: npt.ArrayLike) -> float:
        """Calibrated P(fraud) of one payment, features in ``feature_names_`` order.

        Calls the Booster directly on a NumPy row with one thread: no DataFrame, no sklearn
        wrapper, no OpenMP fan-out (field notes: p99 spikes with default threading).
        """
        self._check_fitted()
        x = np.asarray(row, dtype=np.float64).reshape(1, -1)
        if x.shape[1] != len(self.feature_names_):
            raise FraudModelError(f"expected {len(self.feature_names_)} features, got {x.shape[1]}")
        raw = self.booster_.predict(x, num_iteration=self.best_iteration_, raw_score=True, num_threads=1)
        return float(self.calibrator_(np.asarray(raw, dtype=np.float64))[0])

    # persistence helpers ------------------------------------------------------------------
    @classmethod
    def from_parts(
        cls,
        booster: lgb.Booster,
        calibrator: Calibrator | dict[str, Any],
        params: FraudParams | None = None,
    ) -> FraudModel:
        """Rebuild a fitted model from a stored Booster and calibrator (e.g. loaded from MLflow)."""
        model = cls(params)
        model.booster_ = booster
        model.best_iteration_ = booster.current_iteration()
        model.feature_names_ = list(booster.feature_name())
        model.calibrator_ = calibrator_from_dict(calibrator) if isinstance(calibrator, dict) else calibrator
        return model

    def feature_importance(self, importance_type: str = "gain") -> dict[str, float]:
        """Feature importance of the early-stopped model, by feature name."""
        self._check_fitted()
        values = self.booster_.feature_importance(importance_type, iteration=self.best_iteration_)
        return dict(zip(self.feature_names_, (float(v) for v in values), strict=True))

    def with_params(self, **changes: Any) -> FraudModel:
        """A new unfitted model with some parameters changed (for tuning loops)."""
        return FraudModel(replace(self.resolved_params, **changes))

    def describe(self) -> dict[str, Any]:
        """Parameters, best iteration and calibrator, JSON-ready."""
        self._check_fitted()
        return {
            "params": asdict(self.resolved_params),
            "best_iteration": self.best_iteration_,
            "features": self.feature_names_,
            "calibrator": self.calibrator_.to_dict(),
        }

    def _check_fitted(self) -> None:
        if not hasattr(self, "booster_"):
            raise FraudModelError("the model is not fitted yet: call fit() first")


def _feature_names(X: Matrix, names: Sequence[str] | None) -> list[str]:
    if names is not None:
        return list(names)
    if isinstance(X, pd.DataFrame):
        return [str(c) for c in X.columns]
    return [f"f{i}" for i in range(np.asarray(X).shape[1])]


def _matrix(X: Matrix, names: Sequence[str]) -> npt.NDArray[np.float64]:
    """A float matrix with the columns in training order; missing columns are an error."""
    if isinstance(X, pd.DataFrame):
        missing = [n for n in names if n not in X.columns]
        if missing:
            raise FraudModelError(f"missing feature columns: {missing[:10]}")
        return X[list(names)].to_numpy(dtype=np.float64, na_value=np.nan)
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise FraudModelError(f"expected a 2-D matrix with {len(names)} columns, got shape {arr.shape}")
    return arr


def _labels(y: npt.ArrayLike, what: str) -> npt.NDArray[np.int8]:
    arr = np.asarray(y).ravel()
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise FraudModelError(f"{what} labels must be 0 or 1")
    return arr.astype(np.int8)
