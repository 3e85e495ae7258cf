"""Recommendations as the API serves them: the shared `models.recommend.recommend` plus a log record.

The snapshot (`RecState`) is built from the event tables when the app starts and rebuilt when
the recommender models change. For the decision log, the exact model input of every returned
item is rebuilt with the same `pair_features` the ranker saw and re-scored with the logged
bundle; its raw scores must equal the ranker's, which `recommend_logged` checks.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.bundle import ModelBundle
from models.recommend import Recommendation, Recommender, RecRequest, recommend

log = logging.getLogger("aipic.serving.recsys")


class RecommenderUnavailable(RuntimeError):
    """No snapshot or no ranker for the tier yet."""


@dataclass(frozen=True)
class LoggedRecommendation:
    items: list[Recommendation]
    tier: str
    bundle: ModelBundle
    feature_names: list[str]
    vectors: np.ndarray  # one row per returned item, the ranker's exact input
    raw_scores: np.ndarray


def build_recommender(
    events_dir: Path, bundles: dict[str, ModelBundle], as_of: pd.Timestamp | None = None
) -> Recommender:
    """Snapshot of the event tables as of now plus one ranker per tier (from the registry bundles)."""
    from features.rec_features import RecEvents, build_state
    from models.ranker import LambdaRanker

    events = RecEvents.from_dir(events_dir)
    when = as_of if as_of is not None else pd.Timestamp.now(tz="UTC")
    state = build_state(events, when)
    rankers = {tier: LambdaRanker.from_booster(b.booster) for tier, b in bundles.items()}
    labels: dict[str, str] = {}
    return Recommender(state=state, rankers=rankers, item_labels=labels)


class RecommenderHolder:
    """The current Recommender and the bundles behind its rankers; swapped atomically on rebuild."""

    def __init__(self, events_dir: Path) -> None:
        self.events_dir = events_dir
        self._current: tuple[Recommender, dict[str, ModelBundle]] | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None

    @property
    def ready(self) -> bool:
        return self._current is not None

    def rebuild(self, bundles: dict[str, ModelBundle]) -> None:
        """Build a fresh snapshot with these rankers (by tier); keeps the old one if it fails."""
        if not bundles:
            return
        with self._lock:
            try:
                rec = build_recommender(self.events_dir, bundles)
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("recommender snapshot failed: %s", self.last_error)
                raise
            self._current = (rec, dict(bundles))
            self.last_error = None

    def install(self, rec: Recommender, bundles: dict[str, ModelBundle]) -> None:
        self._current = (rec, dict(bundles))

    def known_user(self, user_id: str) -> bool:
        current = self._current
        return current is not None and current[0].state.user_row(user_id) >= 0

    def recommend_logged(self, request: RecRequest) -> LoggedRecommendation:
        """Serve one request and rebuild the exact input of every returned item for the log."""
        from features.rec_features import pair_features

        current = self._current
        if current is None:
            raise RecommenderUnavailable("the recommender snapshot is not loaded yet")
        rec, bundles = current
        bundle = bundles.get(request.tier)
        if bundle is None:
            raise RecommenderUnavailable(f"no ranker for tier {request.tier}")
        items = recommend(rec, request)
        state = rec.state
        n = len(items)
        row = state.user_row(request.user_id) if request.tier == "personalized" else -1
        cols = state.items.get_indexer(pd.Index([it.item_id for it in items]))
        ctx = state.item_col(request.context_item_id)
        x = pair_features(state, np.full(n, row), cols, np.full(n, ctx), bundle.feature_names)
        x64 = np.asarray(x, dtype=np.float64)
        raw = bundle.raw_score(x64) if n else np.empty(0)
        served = np.array([it.score for it in items], dtype=np.float64)
        if n and not np.array_equal(raw, served):
            log.error("recommendation log vector does not reproduce the ranker's scores")
            raise RecommenderUnavailable("logged vector does not reproduce the served scores")
        return LoggedRecommendation(items, request.tier, bundle, list(bundle.feature_names), x64, raw)
