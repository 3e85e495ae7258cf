"""Figures logged with every model run (and reused by the notebooks).

Built on `matplotlib.figure.Figure` directly, not pyplot: no global backend, nothing kept
alive between runs, and notebooks keep their own inline backend.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve

from models.bundle import Thresholds


def precision_recall(y: np.ndarray, prob: np.ndarray) -> Figure:
    precision, recall, _ = precision_recall_curve(y, prob)
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.plot(recall, precision)
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (held-out window)", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    return fig


def calibration(y: np.ndarray, prob: np.ndarray) -> Figure:
    frac, mean = calibration_curve(y, prob, n_bins=10, strategy="quantile")
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect")
    ax.plot(mean, frac, marker="o", label="model")
    ax.set(xlabel="predicted probability", ylabel="observed fraud rate", title="Calibration (held-out)")
    ax.legend()
    return fig


def importance(values: dict[str, float], top: int = 20) -> Figure:
    items = sorted(values.items(), key=lambda kv: kv[1])[-top:]
    fig = Figure(figsize=(6, max(3, 0.28 * len(items))))
    ax = fig.subplots()
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set(xlabel="gain", title="Feature importance")
    fig.tight_layout()
    return fig


def score_distribution(y: np.ndarray, prob: np.ndarray, thresholds: Thresholds | None) -> Figure:
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    bins = np.linspace(0, 1, 41).tolist()
    ax.hist(prob[y == 0], bins=bins, alpha=0.6, density=True, label="legitimate")
    ax.hist(prob[y == 1], bins=bins, alpha=0.6, density=True, label="fraud")
    if thresholds is not None:
        ax.axvline(thresholds.review, color="orange", ls="--", label="review")
        ax.axvline(thresholds.decline, color="red", ls="--", label="decline")
    ax.set(xlabel="calibrated fraud probability", ylabel="density", title="Score distributions", yscale="log")
    ax.legend()
    return fig


def fraud_figures(
    y: np.ndarray, prob: np.ndarray, feature_importance: dict[str, float], thresholds: Thresholds | None
) -> dict[str, Figure]:
    figs = {
        "precision_recall": precision_recall(y, prob),
        "calibration": calibration(y, prob),
        "feature_importance": importance(feature_importance),
        "score_distribution": score_distribution(y, prob, thresholds),
    }
    return figs
