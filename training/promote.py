"""Champion/challenger promotion: a challenger replaces the champion only when it wins on the
same held-out window, both scored in the same run."""

from __future__ import annotations

from collections.abc import Callable

import mlflow
from mlflow import MlflowClient

from models.bundle import ModelBundle
from training import registry
from training.registry import PromotionResult


def latest_version(name: str) -> str | None:
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    if not versions:
        return None
    return str(max(int(v.version) for v in versions))


def promote(
    name: str,
    evaluate: Callable[[ModelBundle], dict[str, float]],
    metric: str,
    challenger: str | None = None,
) -> PromotionResult:
    """Score champion and challenger with ``evaluate`` (one held-out window) in this run; move the
    alias if the challenger wins.

    A tie keeps the champion (a change must earn its place). With no champion yet, the
    challenger is promoted. Both scores are logged to a ``promote-<name>`` run.
    """
    challenger = challenger or latest_version(name)
    if challenger is None:
        raise registry.ModelNotFound(f"{name} has no registered version: train it first")
    champion = registry.champion_version(name)
    ch_bundle = registry.load_bundle(name, version=challenger)
    ch_score = evaluate(ch_bundle)[metric]
    champ_score: float | None = None
    if champion is not None and champion != challenger:
        champ_score = evaluate(registry.load_bundle(name, version=champion))[metric]
    promoted = champion is None or (champ_score is not None and ch_score > champ_score)
    with mlflow.start_run(run_name=f"promote-{name}", nested=mlflow.active_run() is not None):
        mlflow.log_params({"model": name, "challenger": challenger, "champion_before": str(champion)})
        mlflow.log_metric(f"challenger_{metric}", ch_score)
        if champ_score is not None:
            mlflow.log_metric(f"champion_{metric}", champ_score)
        mlflow.set_tag("promoted", str(promoted))
    if promoted:
        registry.set_champion(name, challenger)
    return PromotionResult(name, challenger, champion, promoted, metric, ch_score, champ_score)
