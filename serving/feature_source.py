"""Adapter from the API to the feature pipeline's real-time functions (`features.online`).

A thin shim on purpose: reading a payment's vector, the request-only vector and applying
payments are the pipeline's job (one implementation, checked against the offline features by
its parity test). The store is opened once per app (SQLite or Redis per settings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from features.settings import Settings
from serving.online import Vector


class PipelineFeatureSource:
    """`FeatureSource` backed by `features.online.OnlineFeatures`."""

    def __init__(self, settings: Settings) -> None:
        from features.online import OnlineFeatures

        self._impl = OnlineFeatures(settings)

    def payment_vector(self, payment: Mapping[str, Any], names: Sequence[str]) -> Vector:
        return dict(self._impl.payment_vector(dict(payment), names))

    def request_vector(self, payment: Mapping[str, Any]) -> Vector:
        return dict(self._impl.request_vector(dict(payment)))

    def score_payments(
        self, payments: Sequence[Mapping[str, Any]], names: Sequence[Sequence[str]]
    ) -> list[Vector]:
        from features.online import record_of, score_online_many

        records = [record_of(dict(p)) for p in payments]
        return [dict(v) for v in score_online_many(self._impl, records, names)]

    def update_interactions(self, events: Sequence[Mapping[str, Any]]) -> None:
        self._impl.update_interactions(events)

    def close(self) -> None:
        self._impl.close()
