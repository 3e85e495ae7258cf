"""Everything a request needs, built once when the app starts and kept in ``app.state.services``.

Heavy objects (models, the recommender snapshot, database engine, the feature store client)
live here so no request loads anything. `Services.start` runs in the lifespan (in a worker
thread: MLflow and Feast are blocking) and flips `ready` only when models and stores are up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy import Engine, text

from features.definitions import FeatureDef
from features.heap import settle_heap
from features.privacy.ledger import ConsentLedger
from features.privacy.registry import Registry, build_registry
from features.settings import Settings
from serving.auth import ApiKeyStore, TokenVerifier
from serving.batching import MicroBatcher
from serving.decisions import DecisionStore, DecisionWriter
from serving.metrics import Metrics
from serving.modelset import REC_TIERS, Loader, ModelManager, rec_name
from serving.online import FeatureSource, OnlineGateway
from serving.profiles import ProfileStore
from serving.ratelimit import RateLimiter
from serving.recsys import RecommenderHolder

if TYPE_CHECKING:
    import datetime as dt

    from features.privacy.gate import GateDecision
    from serving.routes.recommendations import Recommended
    from serving.schemas import PaymentIn, RecommendationIn
    from serving.scoring import Decided

log = logging.getLogger("aipic.serving")


def feature_definitions() -> dict[str, FeatureDef]:
    """Every declared model input by name (payment and recommendation features)."""
    from features.payment_features import PAYMENT_FEATURES
    from features.rec_features import REC_FEATURES

    return {f.name: f for f in [*PAYMENT_FEATURES, *REC_FEATURES]}


def serving_engine(settings: Settings) -> Engine:
    """The API's database engine: a pool as large as the decision threads, no ping per checkout.

    `features.db.engine_for` pings the server at every checkout (a round trip per request); here a
    dead connection is found by using it instead: SQLAlchemy then discards the whole pool and the
    hot-path reads and the decision-log insert retry once on a fresh connection.
    """
    from features.db import engine_for

    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        return engine_for(url)
    from sqlalchemy import create_engine

    from features.db import json_dumps

    return create_engine(
        url,
        json_serializer=json_dumps,
        # every decision thread at once, the scoring batches' commit thread and the rare admin reads
        pool_size=settings.decision_threads + settings.score_batch_workers + 5,
        max_overflow=16,
        pool_pre_ping=False,
        pool_use_lifo=True,
    )


def default_feature_source(settings: Settings) -> FeatureSource:
    """The feature pipeline's online functions (`features.online`)."""
    from serving.feature_source import PipelineFeatureSource

    return PipelineFeatureSource(settings)


@dataclass
class Services:
    settings: Settings
    engine: Engine
    models: ModelManager
    registry: Registry
    ledger: ConsentLedger
    writer: DecisionWriter
    decisions: DecisionStore
    keys: ApiKeyStore
    tokens: TokenVerifier
    limiter: RateLimiter
    metrics: Metrics
    profiles: ProfileStore
    recommender: RecommenderHolder
    scoring: MicroBatcher[PaymentIn, Decided] = field(init=False)
    recommending: MicroBatcher[RecommendationIn, Recommended] = field(init=False)
    online: OnlineGateway | None = None
    feature_defs: dict[str, FeatureDef] = field(default_factory=dict)
    ready: bool = False
    database_ok: bool = False
    startup_error: str | None = None
    _source_factory: Callable[[Settings], FeatureSource] | None = None
    _poller: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        from serving.scoring import decide_payments, log_payment_decisions

        self.scoring = MicroBatcher(
            functools.partial(decide_payments, self),
            workers=self.settings.score_batch_workers,
            max_batch=self.settings.score_max_batch,
            name="aipic-score",
            on_batch=self.metrics.score_batch.observe,
            finish=functools.partial(log_payment_decisions, self),
        )
        from serving.routes.recommendations import decide_and_log_recommendations

        # ranking is CPU, so batches stay small; two threads (AIPIC_DECISION_THREADS) let one's
        # ledger round trip overlap the other's ranking, while more threads only queue for the GIL
        # and stretch the tail; each batch commits its rows in one transaction
        self.recommending = MicroBatcher(
            functools.partial(decide_and_log_recommendations, self),
            workers=self.settings.decision_threads,
            max_batch=8,
            name="aipic-recommend",
        )

    @classmethod
    def create(
        cls,
        settings: Settings,
        engine: Engine,
        model_names: tuple[str, ...],
        feature_source: Callable[[Settings], FeatureSource] | None = None,
        model_loader: Loader | None = None,
    ) -> Services:
        """Cheap construction (no I/O): `start` does the loading."""
        return cls(
            settings=settings,
            engine=engine,
            models=ModelManager(model_names, loader=model_loader),
            registry=build_registry(settings),
            ledger=ConsentLedger(engine),
            writer=DecisionWriter(engine),
            decisions=DecisionStore(engine),
            keys=ApiKeyStore(engine),
            tokens=TokenVerifier(settings),
            limiter=RateLimiter(settings.api_rate_limit, settings.person_rate_limit),
            metrics=Metrics(),
            profiles=ProfileStore(),
            recommender=RecommenderHolder(settings.events_dir, settings),
            _source_factory=feature_source or default_feature_source,
        )

    def gates(self, subject_ids: list[str], purpose: str, now: dt.datetime) -> list[GateDecision]:
        """The purpose gate for a batch's persons: one consent-ledger read for all of them, with
        their profiles (minors) and this service's purpose registry."""
        from features.privacy.gate import decide_many

        profiles = {s: self.profiles.profile(s) for s in subject_ids}
        return decide_many(subject_ids, purpose, now, self.ledger, profiles, self.registry)

    # lifecycle ----------------------------------------------------------------------------------
    def load_blocking(self) -> None:
        """Database schema, models, feature store, snapshot. Failures leave `ready` False."""
        from serving.decisions import ensure_tables

        ensure_tables(self.engine)
        self.database_ok = True
        self.feature_defs = feature_definitions()
        if self.online is None and self._source_factory is not None:
            self.online = OnlineGateway(
                self._source_factory(self.settings), self.settings.online_retry_seconds
            )
        from training.registry import configure

        configure(self.settings)
        try:
            self.models.reload()
        except Exception as exc:
            self.startup_error = f"model load failed: {exc}"
        self.profiles.load(self.settings.events_dir)
        self.refresh_recommender()
        self._warm_online()
        self._publish_models()
        self.update_readiness()
        settle_heap()

    def _warm_online(self) -> None:
        """One read of a made-up payment: the first real request then finds the store connected."""
        import datetime as dt

        if self.online is None:
            return
        probe = {
            "payment_id": "warm-up",
            "user_id": "warm-up",
            "item_ids": [],
            "payment_time": dt.datetime.now(dt.UTC),
            "kind": "purchase",
            "amount": 1.0,
            "currency": "EUR",
        }
        fallback = self.models.current.bundles.get("fraud-request_only")
        self.online.payment_vector(probe, fallback.feature_names if fallback else ["amount"])

    def refresh_recommender(self) -> None:
        current = self.models.current
        bundles = {t: current.bundles[rec_name(t)] for t in REC_TIERS if current.has(rec_name(t))}
        wanted = {rec_name(t) for t in REC_TIERS} & set(self.models.names)
        if not wanted or not bundles:
            return
        try:
            self.recommender.rebuild(bundles)
        except Exception as exc:
            self.startup_error = f"recommender snapshot failed: {exc}"

    def update_readiness(self) -> bool:
        rec_needed = any(n.startswith("recommender-") for n in self.models.names)
        self.ready = (
            self.database_ok
            and self.models.complete
            and self.online is not None
            and (self.recommender.ready or not rec_needed)
        )
        return self.ready

    def _publish_models(self) -> None:
        self.metrics.set_models(self.models.current.versions())

    def reload_models(self, force: bool = False) -> dict[str, str]:
        """Pick up newly promoted champions (blocking; call from a thread)."""
        try:
            changed = self.models.reload(force=force)
        except Exception:
            self.metrics.model_reloads.labels("failed").inc()
            raise
        if any(n.startswith("recommender-") for n in changed):
            self.refresh_recommender()
        if changed:
            self.metrics.model_reloads.labels("swapped").inc()
            self._publish_models()
            settle_heap()
        self.update_readiness()
        return changed

    async def start(self) -> None:
        try:
            await anyio.to_thread.run_sync(self.load_blocking)
        except Exception as exc:  # the app still serves /healthz and /readyz explains why
            self.startup_error = f"{type(exc).__name__}: {exc}"
            log.error("startup incomplete: %s", self.startup_error)
        if self.settings.model_poll_seconds > 0:
            self._poller = asyncio.create_task(self._poll(), name="model-poller")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_poll_seconds)
            try:
                await anyio.to_thread.run_sync(self.reload_models)
            except Exception as exc:
                log.error("model poll failed, keeping current models: %s", type(exc).__name__)

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
        await self.scoring.close()  # decisions in flight finish (and are logged) first
        await self.recommending.close()
        close = getattr(self.online.source if self.online else None, "close", None)
        if close is not None:
            close()
        self.engine.dispose()  # pooled connections closed; the engine still works if used again

    def database_alive(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    def describe_models(self) -> dict[str, Any]:
        return {n: v for n, (v, _) in self.models.current.versions().items()}
