"""Prometheus metrics of one app instance (own registry, so several apps can live in one process)."""

from __future__ import annotations

import threading
import warnings
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values

_INIT_LOCK = threading.Lock()


class _InProcess:
    """Keep values in this process's memory even when ``PROMETHEUS_MULTIPROC_DIR`` is set.

    Importing Feast sets that variable for its own feature server; prometheus-client would then
    store our values in shared mmap files keyed by metric name, so two apps in one process (tests)
    would add up each other's counts. Our registry is per app and single-process by design.
    """

    def _metric_init(self) -> None:
        with _INIT_LOCK:
            saved = _values.ValueClass
            _values.ValueClass = _values.MutexValue
            try:
                super()._metric_init()  # type: ignore[misc]
            finally:
                _values.ValueClass = saved


class LocalCounter(_InProcess, Counter):
    pass


class LocalGauge(_InProcess, Gauge):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("multiprocess_mode", "all")
        super().__init__(*args, **kwargs)


class LocalHistogram(_InProcess, Histogram):
    pass


LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """Latency per endpoint, decisions by outcome and tier, degraded answers, loaded model versions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = LocalHistogram(
            "aipic_http_request_duration_seconds",
            "Time from request start to response start, per route template.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decisions = LocalCounter(
            "aipic_decisions_total",
            "Decisions taken, by purpose, outcome and tier.",
            ["purpose", "outcome", "tier"],
            registry=self.registry,
        )
        self.degraded = LocalCounter(
            "aipic_degraded_total",
            "Answers given on the request-only tier because the online store was unreachable.",
            ["endpoint"],
            registry=self.registry,
        )
        self.model_version = LocalGauge(
            "aipic_model_version",
            "Registered version of each loaded model (value = version number).",
            ["model", "model_hash"],
            registry=self.registry,
        )
        self.model_reloads = LocalCounter(
            "aipic_model_reloads_total", "Model set swaps, by result.", ["result"], registry=self.registry
        )
        self.online_store_up = LocalGauge(
            "aipic_online_store_up", "1 if the last online-store call succeeded.", registry=self.registry
        )
        self.score_batch = LocalHistogram(
            "aipic_score_batch_size",
            "Scoring requests decided together (one ledger query, one Redis round trip, one transaction).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self._model_labels: set[tuple[str, str]] = set()
        self.rate_limited = LocalCounter(
            "aipic_rate_limited_total", "Requests refused by the rate limit.", registry=self.registry
        )

    def set_models(self, versions: dict[str, tuple[str, str]]) -> None:
        """Replace the model-version gauge with ``{name: (version, hash)}``."""
        labels = {(name, model_hash[:12]): version for name, (version, model_hash) in versions.items()}
        for stale in self._model_labels - set(labels):
            with warnings.catch_warnings():  # values are in-process (see _InProcess): removal is fine
                warnings.simplefilter("ignore", UserWarning)
                self.model_version.remove(*stale)
        for (name, short), version in labels.items():
            try:
                value = float(version)
            except ValueError:
                value = -1.0
            self.model_version.labels(model=name, model_hash=short).set(value)
        self._model_labels = set(labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
