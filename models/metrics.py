"""Fraud-detection metrics, including the handbook's card precision@k.

Why a module of its own: the benchmark, the training run logged to MLflow and the promotion
check must compute the same numbers the same way. Everything is vectorised; the only loop is
over test days (a handful), because card precision@k carries state from one day to the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

ArrayLike = npt.ArrayLike


class MetricError(ValueError):
    """The inputs cannot give a meaningful metric (e.g. a single class, mismatched lengths)."""


def _as_arrays(y_true: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int8).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise MetricError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.isfinite(s).all():
        raise MetricError("scores contain NaN or infinite values")
    return y, s


def _need_both_classes(y: np.ndarray, name: str) -> None:
    positives = int(y.sum())
    if positives == 0 or positives == y.size:
        raise MetricError(f"{name} needs both classes; got {positives} positives out of {y.size}")


def auc_roc(y_true: ArrayLike, score: ArrayLike) -> float:
    """Area under the ROC curve over all transactions."""
    y, s = _as_arrays(y_true, score)
    _need_both_classes(y, "AUC ROC")
    return float(roc_auc_score(y, s))


def average_precision(y_true: ArrayLike, score: ArrayLike) -> float:
    """Average precision (area under the precision-recall curve, step-wise, as scikit-learn)."""
    y, s = _as_arrays(y_true, score)
    _need_both_classes(y, "average precision")
    return float(average_precision_score(y, s))


def recall_at_fpr(y_true: ArrayLike, score: ArrayLike, max_fpr: float = 0.01) -> float:
    """Highest share of frauds caught while flagging at most ``max_fpr`` of legitimate payments."""
    y, s = _as_arrays(y_true, score)
    _need_both_classes(y, "recall at FPR")
    fpr, tpr, _ = roc_curve(y, s)
    return float(tpr[fpr <= max_fpr].max())


def calibration_error(y_true: ArrayLike, probability: ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error: bin-weighted |mean predicted - observed fraud rate|.

    Equal-width bins on [0, 1]; a probability outside [0, 1] is an error, not clipped.
    """
    y, p = _as_arrays(y_true, probability)
    if y.size == 0:
        raise MetricError("calibration error of an empty sample")
    if (p < 0).any() or (p > 1).any():
        raise MetricError("probabilities must lie in [0, 1]")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(bins, weights=p, minlength=n_bins)
    sum_y = np.bincount(bins, weights=y.astype(np.float64), minlength=n_bins)
    used = count > 0
    gap = np.abs(sum_p[used] - sum_y[used])  # = count * |mean_p - mean_y|
    return float(gap.sum() / y.size)


def recall_per_pattern(
    pattern: Sequence[str | None] | pd.Series | npt.NDArray[Any],
    flagged: ArrayLike,
    none_values: Sequence[str] = ("none",),
) -> dict[str, float]:
    """Share of each planted fraud pattern's payments that were flagged (ground truth: evaluation only)."""
    pat = pd.Series(pattern, dtype="object").reset_index(drop=True)
    flag = np.asarray(flagged, dtype=bool).ravel()
    if flag.size != len(pat):
        raise MetricError(f"patterns and flags differ in length: {len(pat)} vs {flag.size}")
    is_fraud = pat.notna() & ~pat.isin(list(none_values))
    frame = pd.DataFrame({"pattern": pat[is_fraud], "flag": flag[is_fraud.to_numpy()]})
    recall = frame.groupby("pattern", sort=True)["flag"].mean()
    return {str(k): float(v) for k, v in recall.items()}


@dataclass(frozen=True)
class CardPrecision:
    """Card precision@k of the handbook: the mean over days and the per-day details."""

    mean: float
    per_day: list[float] = field(default_factory=list)
    compromised_cards_per_day: list[int] = field(default_factory=list)
    days: list[int] = field(default_factory=list)


def card_precision_at_k(
    day: ArrayLike,
    card: ArrayLike,
    y_true: ArrayLike,
    score: ArrayLike,
    k: int = 100,
    remove_detected: bool = True,
) -> CardPrecision:
    """Card precision@k as the fraud-detection handbook (chapter 4) defines it.

    ``day`` is an integer day index (e.g. days since an origin). Per day: each card's highest score and whether any of its payments that day is fraud; the
    ``k`` cards with the highest scores are "investigated"; precision is the number of
    compromised cards among them divided by ``k`` (always ``k``, even on a day with fewer
    cards). With ``remove_detected``, compromised cards caught on an earlier day are left out
    of later days. The result is the mean over days. Ties in score are broken by card id so
    the result is deterministic.
    """
    if k <= 0:
        raise MetricError("k must be positive")
    y, s = _as_arrays(y_true, score)
    frame = pd.DataFrame({"day": np.asarray(day).ravel(), "card": np.asarray(card).ravel(), "y": y, "s": s})
    if len(frame) != y.size:
        raise MetricError("day, card, labels and scores must have the same length")
    per_card = frame.groupby(["day", "card"], sort=True).agg(s=("s", "max"), y=("y", "max")).reset_index()
    detected: set[object] = set()
    per_day: list[float] = []
    compromised: list[int] = []
    days: list[int] = []
    for d, cards in per_card.groupby("day", sort=True):
        if remove_detected and detected:
            cards = cards[~cards["card"].isin(detected)]
        compromised.append(int(cards["y"].sum()))
        ranked = cards.sort_values(["s", "card"], ascending=[False, True], kind="mergesort")
        top = ranked.head(k)
        caught = top.loc[top["y"] == 1, "card"]
        per_day.append(len(caught) / k)
        days.append(int(d))  # type: ignore[arg-type]
        if remove_detected:
            detected.update(caught.tolist())
    if not per_day:
        raise MetricError("card precision of an empty sample")
    return CardPrecision(float(np.mean(per_day)), per_day, compromised, days)


def fraud_metrics(
    y_true: ArrayLike,
    score: ArrayLike,
    day: ArrayLike | None = None,
    card: ArrayLike | None = None,
    k: int = 100,
) -> dict[str, float]:
    """The ranking metrics reported everywhere: AUC ROC, AP, recall at 1 % FPR and, with cards, CP@k."""
    out = {
        "auc_roc": auc_roc(y_true, score),
        "average_precision": average_precision(y_true, score),
        "recall_at_1pct_fpr": recall_at_fpr(y_true, score, 0.01),
    }
    if day is not None and card is not None:
        out[f"card_precision_at_{k}"] = card_precision_at_k(day, card, y_true, score, k=k).mean
    return out
