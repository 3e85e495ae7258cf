"""Recommendations as the API serves them: the shared `models.recommend.recommend` plus a log record.

Where the inputs come from (see `features.rec_feast`):

* the catalogue (items, ``item_*`` features, item-item graphs) is the artifact of the last
  ``aipic features build``, loaded when the app starts or its recommender models change;
* the person's interactions are their row of the Feast view ``recommender_user_history``,
  read from the online store at every personalised request (appended to by POST /v1/events), and turned
  into their features as of the request time by `person_state`, the function the offline
  snapshot (`build_state`) runs for every person.

A request of the limited tier reads nothing of the person: no history, their state is
nobody's (built once per catalogue). A personalised request reads the history once and builds
the person's state once (`request_state`), which the whole request then uses.

For the decision log, the exact model input of every returned item (its row of the matrix the
ranker scored) is re-scored with the logged bundle; its raw scores must equal the ranker's,
which `recommend_logged` checks.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd

from models.bundle import ModelBundle
from models.recommend import Recommendation, Recommender, RecRequest, ScoredRequest, score_request, serve

if TYPE_CHECKING:
    from features.rec_features import Catalogue, History, RecState, Tier
    from features.settings import Settings

log = logging.getLogger("aipic.serving.recsys")

CATALOGUE_CHECK_SECONDS = 1.0  # how often a request looks whether a feature build replaced the catalogue


class RecommenderUnavailable(RuntimeError):
    """No catalogue, no ranker for the tier, or the online history could not be read."""


class HistorySource(Protocol):
    """Where a person's interactions are read from (the Feast online store in the API)."""

    def read(self, user_id: str) -> History | None: ...


@dataclass(frozen=True)
class LoggedRecommendation:
    items: list[Recommendation]
    tier: str
    bundle: ModelBundle
    feature_names: list[str]
    vectors: np.ndarray  # one row per returned item, the ranker's exact input
    raw_scores: np.ndarray


@dataclass(frozen=True)
class _Loaded:
    template: Recommender  # the catalogue with no person, the rankers and the rules
    catalogue: Catalogue
    bundles: dict[str, ModelBundle]
    from_build: bool  # the catalogue file of the feature build (re-read when a build replaces it)


def build_recommender(catalogue: Catalogue, bundles: dict[str, ModelBundle]) -> Recommender:
    """A Recommender over the catalogue (no person yet) with one ranker per tier."""
    from features.rec_features import person_state
    from models.ranker import LambdaRanker

    rankers = {tier: LambdaRanker.from_booster(b.booster) for tier, b in bundles.items()}
    return Recommender(state=person_state(catalogue, "", None, catalogue.as_of), rankers=rankers)


class RecommenderHolder:
    """The current catalogue and rankers (swapped atomically on rebuild) and the history reader."""

    def __init__(
        self, events_dir: Path, settings: Settings | None = None, history: HistorySource | None = None
    ) -> None:
        self.events_dir = events_dir
        self._settings = settings
        self._history = history
        self._current: _Loaded | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self._checked: tuple[float, _Loaded, Catalogue] | None = None  # last look at the build's file

    @property
    def ready(self) -> bool:
        return self._current is not None

    def _offline_dir(self) -> Path:
        from features.settings import get_settings
        from features.store import offline_dir

        return offline_dir(self._settings or get_settings())

    def history(self) -> HistorySource:
        """The Feast online history reader, opened on first use."""
        if self._history is None:
            with self._lock:
                if self._history is None:
                    from features.rec_feast import history_store
                    from features.settings import get_settings
                    from features.store import open_feature_store

                    self._history = history_store(open_feature_store(self._settings or get_settings()))
        return self._history

    def rebuild(self, bundles: dict[str, ModelBundle]) -> None:
        """Load the last build's catalogue with these rankers (by tier); keeps the old one if it fails."""
        from features.rec_feast import load_catalogue

        if not bundles:
            return
        with self._lock:
            try:
                cat = load_catalogue(self._offline_dir())
                rec = build_recommender(cat, bundles)
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("recommender catalogue failed to load: %s", self.last_error)
                raise
            self._current = _Loaded(rec, cat, dict(bundles), from_build=True)
            self.last_error = None
        self.history()  # connect now: the first request then finds the store open

    def install(self, rec: Recommender, bundles: dict[str, ModelBundle]) -> None:
        """Serve this recommender's catalogue and rankers (tests, benchmarks)."""
        self._current = _Loaded(rec, rec.state.catalogue(), dict(bundles), from_build=False)

    def _loaded(self) -> _Loaded:
        current = self._current
        if current is None:
            raise RecommenderUnavailable("the recommender catalogue is not loaded yet")
        return current

    def catalogue(self) -> Catalogue:
        """The catalogue of the last feature build: a new build's file is picked up within a
        second (its file is looked at, one stat, at most once per second; read once per version)."""
        from features.rec_feast import load_catalogue

        current = self._loaded()
        if not current.from_build:
            return current.catalogue
        checked = self._checked
        now = time.monotonic()
        if checked is not None and checked[1] is current and now - checked[0] < CATALOGUE_CHECK_SECONDS:
            return checked[2]
        try:
            cat = load_catalogue(self._offline_dir())
        except Exception as exc:
            log.error("recommender catalogue unreadable, serving the loaded one: %s", type(exc).__name__)
            cat = current.catalogue
        self._checked = (now, current, cat)
        return cat

    def person(self, user_id: str | None, now: dt.datetime | None = None) -> RecState:
        """The state one request needs: the catalogue and the person's rows as of `now`
        (`user_id` None: nobody, and nothing is read)."""
        from features.rec_features import person_state

        cat = self.catalogue()
        when = pd.Timestamp(now if now is not None else dt.datetime.now(dt.UTC))
        if user_id is None:
            return person_state(cat, "", None, when)
        try:
            history = self.history().read(user_id)
        except Exception as exc:  # the driver message may contain keys: log the type only
            log.error("recommendation history unreadable: %s", type(exc).__name__)
            raise RecommenderUnavailable("the online store cannot be read: retry later") from None
        return person_state(cat, user_id, history, when)

    def request_state(
        self, user_id: str, tier: Tier, now: dt.datetime | None = None
    ) -> tuple[Tier, RecState]:
        """The tier a request is served in and its state, built once.

        Personalised: the person's history is read and their rows built; a person without
        interactions with catalogue items is served the limited tier instead. Limited: no
        personal data at all, the person's history is not even read (the state of nobody).
        """
        self._loaded()
        if tier == "personalized":
            state = self.person(user_id, now)
            if state.user_row(user_id) >= 0:
                return tier, state
        return "limited", self.person(None, now)

    def score_online(
        self, request: RecRequest, now: dt.datetime | None = None
    ) -> tuple[RecState, ScoredRequest]:
        """Every candidate of a request with its model input, as served (the parity test reads it)."""
        current = self._loaded()
        state = self._state_of(request, now)
        return state, score_request(replace(current.template, state=state), request)

    def _state_of(self, request: RecRequest, now: dt.datetime | None) -> RecState:
        """The request's state for its tier as given (limited: nobody's, nothing read)."""
        return self.person(request.user_id if request.tier == "personalized" else None, now)

    def recommend_logged(
        self, request: RecRequest, now: dt.datetime | None = None, *, state: RecState | None = None
    ) -> LoggedRecommendation:
        """Serve one request and keep the exact input of every returned item for the log.

        `state`: the one `request_state` built for this request (else built here for its tier).
        The logged vectors are the returned items' rows of the matrix the ranker scored; the
        logged bundle must reproduce the served scores from them, bit for bit.
        """
        from features.rec_features import tier_feature_names

        current = self._loaded()
        bundle = current.bundles.get(request.tier)
        if bundle is None:
            raise RecommenderUnavailable(f"no ranker for tier {request.tier}")
        if list(bundle.feature_names) != tier_feature_names(request.tier):
            log.error("recommender bundle %s does not take the %s tier's inputs", bundle.name, request.tier)
            raise RecommenderUnavailable(f"the {request.tier} ranker does not take its tier's inputs")
        if state is None:
            state = self._state_of(request, now)
        served = serve(replace(current.template, state=state), request)
        items, n = served.items, len(served.items)
        x64 = np.asarray(served.features, dtype=np.float64)
        raw = bundle.raw_score(x64) if n else np.empty(0)
        scores = np.array([it.score for it in items], dtype=np.float64)
        if n and not np.array_equal(raw, scores):
            log.error("recommendation log vector does not reproduce the ranker's scores")
            raise RecommenderUnavailable("logged vector does not reproduce the served scores")
        return LoggedRecommendation(items, request.tier, bundle, list(bundle.feature_names), x64, raw)
