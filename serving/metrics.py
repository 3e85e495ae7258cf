"""Prometheus metrics of one app instance (own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """Latency per endpoint, decisions by outcome and tier, degraded answers, loaded model versions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "aipic_http_request_duration_seconds",
            "Time from request start to response start, per route template.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "aipic_decisions_total",
            "Decisions taken, by purpose, outcome and tier.",
            ["purpose", "outcome", "tier"],
            registry=self.registry,
        )
        self.degraded = Counter(
            "aipic_degraded_total",
            "Answers given on the request-only tier because the online store was unreachable.",
            ["endpoint"],
            registry=self.registry,
        )
        self.model_version = Gauge(
            "aipic_model_version",
            "Registered version of each loaded model (value = version number).",
            ["model", "model_hash"],
            registry=self.registry,
        )
        self.model_reloads = Counter(
            "aipic_model_reloads_total", "Model set swaps, by result.", ["result"], registry=self.registry
        )
        self.online_store_up = Gauge(
            "aipic_online_store_up", "1 if the last online-store call succeeded.", registry=self.registry
        )
        self.rate_limited = Counter(
            "aipic_rate_limited_total", "Requests refused by the rate limit.", registry=self.registry
        )

    def set_models(self, versions: dict[str, tuple[str, str]]) -> None:
        """Replace the model-version gauge with ``{name: (version, hash)}``."""
        self.model_version.clear()
        for name, (version, model_hash) in versions.items():
            try:
                value = float(version)
            except ValueError:
                value = -1.0
            self.model_version.labels(model=name, model_hash=model_hash[:12]).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
