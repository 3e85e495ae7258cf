"""A trained model as serving needs it: booster, ordered inputs, calibration, thresholds.

Training writes a bundle to MLflow (the LightGBM booster as the MLflow model, the rest as
`bundle.json` beside it); serving loads the champion alias back into the same class, so the
way features become a model input is defined once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np

from models.fraud import Calibrator, calibrator_from_dict

BUNDLE_FILE = "bundle.json"


@dataclass(frozen=True)
class Thresholds:
    """Probability cut-offs: review at or above ``review``, decline at or above ``decline``."""

    review: float
    decline: float
    rationale: str = ""

    def outcome(self, probability: float) -> str:
        if probability >= self.decline:
            return "decline"
        if probability >= self.review:
            return "review"
        return "approve"


@dataclass
class ModelBundle:
    """Everything needed to score one vector and explain it later."""

    name: str  # registered model name, e.g. fraud-full
    purpose: str  # privacy-registry purpose
    tier: str
    feature_names: list[str]
    booster: lgb.Booster
    calibration: Calibrator | None = None
    thresholds: Thresholds | None = None
    version: str = "unregistered"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_hash(self) -> str:
        """SHA-256 of the booster's text dump: identifies the exact trees that scored a decision."""
        return hashlib.sha256(self.booster.model_to_string().encode()).hexdigest()

    def vector(self, features: dict[str, float | None]) -> np.ndarray:
        """Model input in the bundle's column order; missing values become NaN."""
        return np.array(
            [[np.nan if features.get(n) is None else float(features[n]) for n in self.feature_names]],  # type: ignore[arg-type]
            dtype=np.float64,
        )

    def raw_score(self, x: np.ndarray) -> np.ndarray:
        """Raw margin straight from the booster (fast path: no sklearn wrapper, one thread)."""
        return np.asarray(self.booster.predict(x, raw_score=True, num_threads=1))

    def probability(self, raw: np.ndarray) -> np.ndarray:
        if self.calibration is None:
            return np.asarray(0.5 * (1.0 + np.tanh(0.5 * raw)))
        return np.asarray(self.calibration(np.asarray(raw, dtype=np.float64)))

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """Exact TreeSHAP contributions in log-odds; last column is the base value; rows sum to raw."""
        return np.asarray(self.booster.predict(x, pred_contrib=True, num_threads=1))

    # Serialisation -------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "purpose": self.purpose,
            "tier": self.tier,
            "feature_names": self.feature_names,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "thresholds": asdict(self.thresholds) if self.thresholds else None,
            "extra": self.extra,
        }

    def meta_json(self) -> str:
        return json.dumps(self.meta(), indent=2, sort_keys=True)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], booster: lgb.Booster, version: str) -> ModelBundle:
        cal = meta.get("calibration")
        thr = meta.get("thresholds")
        return cls(
            name=meta["name"],
            purpose=meta["purpose"],
            tier=meta["tier"],
            feature_names=list(meta["feature_names"]),
            booster=booster,
            calibration=calibrator_from_dict(cal) if cal else None,
            thresholds=Thresholds(**thr) if thr else None,
            version=version,
            extra=dict(meta.get("extra", {})),
        )
