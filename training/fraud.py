"""Train, evaluate and register one fraud model per tier through MLflow.

`aipic train fraud` and `mlflow run . -e train_fraud` both call `train_fraud`. Each tier gets
its own run (nested under the `mlflow run` run when there is one) and registered model
``fraud-<tier>``; the first version becomes ``champion``, later ones only through `promote`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightgbm as lgb
import mlflow
import numpy as np
import pandas as pd

from features.definitions import FeatureDef
from features.settings import Settings, get_settings
from models.bundle import ModelBundle, Thresholds
from models.fraud import FraudModel, FraudParams
from models.metrics import calibration_error, fraud_metrics, recall_per_pattern
from training import plots, registry
from training.fraud_data import (
    FRAUD_PURPOSE,
    Windows,
    fingerprint,
    labelled_examples,
    split,
    tier_consent_mask,
    tier_features,
)

EXPERIMENT = "fraud"


def model_name(tier: str) -> str:
    return f"fraud-{tier}"


def choose_thresholds(prob: np.ndarray, settings: Settings) -> Thresholds:
    """Decline where the expected cost of approving exceeds that of declining; review by budget.

    Approving a payment with fraud probability p costs p * chargeback_cost * amount; declining
    it costs (1 - p) * false_decline_cost * amount, so decline when
    p >= false_decline_cost / (false_decline_cost + chargeback_cost). Review the riskiest
    ``fraud_review_budget`` share of payments below that (the alert budget), measured on the
    calibration slice.
    """
    c_fd, c_cb = settings.fraud_false_decline_cost, settings.fraud_chargeback_cost
    decline = c_fd / (c_fd + c_cb)
    budget = settings.fraud_review_budget
    below = float(np.mean(prob < decline)) if len(prob) else 1.0
    review = float(np.quantile(prob, max(below - budget, 0.0))) if len(prob) else decline
    review = min(max(review, 0.01), decline)
    rationale = (
        f"decline at p>={decline:.3f} = false_decline_cost {c_fd} / (false_decline_cost + chargeback_cost "
        f"{c_cb}); review at p>={review:.3f} so at most {budget:.1%} of payments wait for a person"
    )
    return Thresholds(review=round(review, 6), decline=round(decline, 6), rationale=rationale)


def evaluate(bundle: ModelBundle, test: pd.DataFrame) -> dict[str, float]:
    """Metrics of a bundle on a held-out slice (the same numbers promotion compares)."""
    x = test[bundle.feature_names].to_numpy(dtype=np.float64)
    raw = np.asarray(bundle.booster.predict(x, raw_score=True))
    prob = bundle.probability(raw)
    y = test["label"].to_numpy()
    day = (pd.to_datetime(test["payment_time"], utc=True) - pd.Timestamp("1970-01-01", tz="UTC")).dt.days
    out = fraud_metrics(y, raw, day=day.to_numpy(), card=test["card_fingerprint"].fillna("none").to_numpy())
    out["calibration_error"] = calibration_error(y, prob)
    if bundle.thresholds is not None:
        flagged = prob >= bundle.thresholds.review
        per = recall_per_pattern(test["fraud_pattern"].reset_index(drop=True), flagged)
        out.update({f"recall_at_review_{k}": float(v) for k, v in per.items()})
        out["review_or_decline_rate"] = float(flagged.mean())
    return out


@dataclass
class TierResult:
    tier: str
    run_id: str
    version: str
    metrics: dict[str, float]
    champion: bool


def default_params(defs: Sequence[FeatureDef]) -> FraudParams:
    """The marketplace's booster settings, with each input's declared monotone direction."""
    monotone = tuple((f.name, int(f.monotone)) for f in defs if f.monotone)
    return FraudParams(num_boost_round=600, early_stopping_rounds=60, monotone=monotone)


def train_tier(
    tier: str,
    slices: dict[str, pd.DataFrame],
    windows: Windows,
    data_fingerprint: str,
    events_dir: Path,
    settings: Settings,
    params: FraudParams | None = None,
) -> TierResult:
    """Fit, calibrate, threshold, evaluate, log and register the model of one tier."""
    defs = tier_features(tier)
    names = [f.name for f in defs]
    keep = {k: v[tier_consent_mask(v, tier, events_dir)] for k, v in slices.items()}
    model = FraudModel(params or default_params(defs))
    model.fit(
        keep["train"][names],
        keep["train"]["label"],
        keep["valid"][names],
        keep["valid"]["label"],
        keep["calib"][names],
        keep["calib"]["label"],
    )
    booster = lgb.Booster(model_str=model.booster_.model_to_string(num_iteration=model.best_iteration_))
    calib_prob = model.predict_proba(keep["calib"][names])[:, 1]
    bundle = ModelBundle(
        name=model_name(tier),
        purpose=FRAUD_PURPOSE,
        tier=tier,
        feature_names=names,
        booster=booster,
        calibration=model.calibrator_,
        thresholds=choose_thresholds(calib_prob, settings),
        extra={"policy_version": settings.policy_version, "data_fingerprint": data_fingerprint},
    )
    metrics = evaluate(bundle, keep["test"])
    with mlflow.start_run(run_name=f"fraud-{tier}", nested=mlflow.active_run() is not None) as run:
        mlflow.log_params(
            {
                "tier": tier,
                "purpose": FRAUD_PURPOSE,
                "policy_version": settings.policy_version,
                "data_fingerprint": data_fingerprint,
                "label_delay_days": settings.label_delay_days,
                "n_features": len(names),
                **{f"slice_{k}_rows": len(v) for k, v in keep.items()},
                **windows.as_params(),
                **{f"lgb_{k}": v for k, v in model.describe()["params"].items() if k != "monotone"},
                "monotone_increasing": ",".join(n for n, d in model.resolved_params.monotone if d > 0),
                "best_iteration": model.best_iteration_,
            }
        )
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
        mlflow.log_dict(
            {
                f.name: {"categories": list(f.categories), "source": f.source, "entity": f.entity}
                for f in defs
            },
            "features.json",
        )
        mlflow.log_dict(bundle.meta(), "bundle.json")
        test_x = keep["test"][names]
        test_prob = bundle.probability(np.asarray(booster.predict(test_x.to_numpy(), raw_score=True)))
        for fname, fig in plots.fraud_figures(
            keep["test"]["label"].to_numpy(), test_prob, model.feature_importance(), bundle.thresholds
        ).items():
            mlflow.log_figure(fig, f"plots/{fname}.png")
        version = registry.log_bundle(bundle, keep["train"][names].head(50))
        became_champion = registry.champion_version(bundle.name) is None
        if became_champion:
            registry.set_champion(bundle.name, version)
        return TierResult(tier, run.info.run_id, version, metrics, became_champion)


def train_fraud(
    events_dir: Path,
    tiers: list[str],
    train_days: int = 0,
    label_delay_days: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train every requested tier on the same slices; return a JSON-able summary."""
    settings = get_settings()
    if label_delay_days is not None and label_delay_days >= 0:
        settings = settings.model_copy(update={"label_delay_days": label_delay_days})
    registry.configure(settings)
    registry.ensure_experiment(EXPERIMENT, settings)
    say = progress or (lambda _m: None)
    say("computing point-in-time payment features")
    examples = labelled_examples(events_dir)
    slices, windows = split(examples, settings.label_delay_days, train_days)
    fp = fingerprint(events_dir)
    results = {}
    for tier in tiers:
        say(f"training fraud-{tier}")
        results[tier] = train_tier(tier, slices, windows, fp, events_dir, settings)
    return {
        "data_fingerprint": fp,
        "windows": windows.as_params(),
        "tiers": {
            t: {"version": r.version, "run_id": r.run_id, "champion": r.champion, "metrics": r.metrics}
            for t, r in results.items()
        },
    }


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, default=str, sort_keys=True)


def _evaluate_on(test: pd.DataFrame, bundle: ModelBundle) -> dict[str, float]:
    return evaluate(bundle, test)


def _held_out(events_dir: Path, settings: Settings) -> tuple[pd.DataFrame, Windows]:
    examples = labelled_examples(events_dir)
    slices, windows = split(examples, settings.label_delay_days)
    return slices["test"], windows


def evaluate_champions(
    events_dir: Path, tiers: list[str], progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Metrics of each tier's champion on the current held-out window, logged to MLflow."""
    settings = get_settings()
    registry.configure(settings)
    registry.ensure_experiment(EXPERIMENT, settings)
    say = progress or (lambda _m: None)
    say("computing point-in-time payment features")
    test, windows = _held_out(events_dir, settings)
    out: dict[str, Any] = {"windows": windows.as_params(), "tiers": {}}
    for tier in tiers:
        bundle = registry.load_bundle(model_name(tier))
        subset = test[tier_consent_mask(test, tier, events_dir)]
        metrics = evaluate(bundle, subset)
        with mlflow.start_run(run_name=f"evaluate-fraud-{tier}", nested=mlflow.active_run() is not None):
            mlflow.log_params({"model": bundle.name, "version": bundle.version, **windows.as_params()})
            mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        out["tiers"][tier] = {"version": bundle.version, "metrics": metrics}
    return out


def promote_fraud(
    events_dir: Path, model: str = "all", progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the champion/challenger rule for one or every fraud model on today's held-out window."""
    from training.fraud_data import fraud_tiers
    from training.promote import promote

    settings = get_settings()
    registry.configure(settings)
    registry.ensure_experiment(EXPERIMENT, settings)
    say = progress or (lambda _m: None)
    names = [model_name(t) for t in fraud_tiers()] if model == "all" else [model]
    say("computing the held-out window")
    test, _ = _held_out(events_dir, settings)
    results = {}
    for name in names:
        tier = name.removeprefix("fraud-")
        subset = test[tier_consent_mask(test, tier, events_dir)]
        results[name] = promote(name, partial(_evaluate_on, subset), metric="average_precision").as_dict()
    return results
