"""LightGBM lambdarank ranker with the scikit-learn fit/predict contract.

Why not `lightgbm.LGBMRanker`: serving scores one request of a few hundred candidates, and the
scikit-learn wrapper costs about a millisecond of overhead per call (field notes). Training goes
through `lightgbm.train`; scoring calls `Booster.predict` on a NumPy array with one thread,
which avoids the multi-thread latency spikes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
from sklearn.base import BaseEstimator


class RankerError(ValueError):
    """Inputs the ranker cannot learn from or score (shape, groups, unfitted model)."""


def _group_sizes(group: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    sizes = np.asarray(group, dtype=np.int64)
    if sizes.ndim != 1 or (sizes <= 0).any() or int(sizes.sum()) != n:
        raise RankerError(f"group sizes must be positive and sum to the {n} rows; got sum {int(sizes.sum())}")
    return sizes


class LambdaRanker(BaseEstimator):
    """Learning-to-rank by lambdarank (nDCG); `group` gives the consecutive rows of each request."""

    def __init__(
        self,
        n_estimators: int = 300,
        learning_rate: float = 0.05,
        num_leaves: int = 31,
        min_child_samples: int = 50,
        feature_fraction: float = 0.8,
        bagging_fraction: float = 0.8,
        lambda_l2: float = 1.0,
        max_bin: int = 63,
        truncation_level: int = 20,
        early_stopping_rounds: int = 30,
        random_state: int = 0,
        n_jobs: int = 2,
    ) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.feature_fraction = feature_fraction
        self.bagging_fraction = bagging_fraction
        self.lambda_l2 = lambda_l2
        self.max_bin = max_bin
        self.truncation_level = truncation_level
        self.early_stopping_rounds = early_stopping_rounds
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _params(self, threads: int) -> dict[str, Any]:
        return {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [10],
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1 if self.bagging_fraction < 1 else 0,
            "lambda_l2": self.lambda_l2,
            "max_bin": self.max_bin,
            "lambdarank_truncation_level": self.truncation_level,
            "seed": self.random_state,
            "deterministic": True,
            "num_threads": threads,
            "verbosity": -1,
        }

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        group: Sequence[int] | np.ndarray,
        feature_names: Sequence[str] | None = None,
        eval_set: tuple[np.ndarray, np.ndarray, Sequence[int] | np.ndarray] | None = None,
    ) -> LambdaRanker:
        """Fit on rows grouped by request; with `eval_set`, stop when its nDCG@10 stops improving."""
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y).astype(np.int32).ravel()
        if X.ndim != 2 or len(X) != len(y):
            raise RankerError(f"X must be 2-D with one row per label; got {X.shape} and {y.shape}")
        names = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(X.shape[1])]
        if len(names) != X.shape[1]:
            raise RankerError(f"{len(names)} feature names for {X.shape[1]} columns")
        train = lgb.Dataset(X, y, group=_group_sizes(group, len(X)), feature_name=names, free_raw_data=True)
        valid_sets: list[lgb.Dataset] = []
        callbacks: list[Any] = []
        if eval_set is not None:
            Xv, yv, gv = eval_set
            Xv = np.asarray(Xv, dtype=np.float32)
            valid = lgb.Dataset(
                Xv, np.asarray(yv).astype(np.int32), group=_group_sizes(gv, len(Xv)), reference=train
            )
            valid_sets = [valid]
            callbacks = [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]
        self.booster_ = lgb.train(
            self._params(self.n_jobs),
            train,
            num_boost_round=self.n_estimators,
            valid_sets=valid_sets,
            callbacks=callbacks,
        )
        self.best_iteration_ = int(self.booster_.best_iteration or self.booster_.current_iteration())
        self.feature_names_ = names
        self.n_features_in_ = X.shape[1]
        # scoring passes num_threads=1 per call (Booster.reset_parameter after training on a
        # freed Dataset crashes LightGBM 4.7)
        return self

    def _check_fitted(self) -> lgb.Booster:
        booster = getattr(self, "booster_", None)
        if booster is None:
            raise RankerError("the ranker is not fitted: call fit() or load() first")
        return booster

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Relevance scores (higher = earlier in the list); comparable within one request only."""
        booster = self._check_fitted()
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise RankerError(f"expected (n, {self.n_features_in_}) features, got {X.shape}")
        out = booster.predict(X, num_iteration=self.best_iteration_, num_threads=1)
        return np.asarray(out, dtype=np.float64)

    def feature_importance(self) -> dict[str, float]:
        booster = self._check_fitted()
        gain = booster.feature_importance(importance_type="gain", iteration=self.best_iteration_)
        return dict(zip(self.feature_names_, (float(g) for g in gain), strict=True))

    # persistence -------------------------------------------------------------------------
    def save(self, path: Path) -> Path:
        booster = self._check_fitted()
        path.parent.mkdir(parents=True, exist_ok=True)
        booster.save_model(str(path), num_iteration=self.best_iteration_)
        return path

    @classmethod
    def load(cls, path: Path) -> LambdaRanker:
        if not Path(path).exists():
            raise RankerError(f"no ranker model at {path}")
        booster = lgb.Booster(model_file=str(path))
        return cls.from_booster(booster)

    @classmethod
    def from_booster(cls, booster: lgb.Booster) -> LambdaRanker:
        """Wrap a trained Booster (e.g. loaded from the MLflow registry)."""
        model = cls()
        model.booster_ = booster
        model.best_iteration_ = int(booster.current_iteration())
        model.feature_names_ = list(booster.feature_name())
        model.n_features_in_ = booster.num_feature()
        return model
