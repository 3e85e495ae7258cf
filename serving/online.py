"""The online feature store as the API sees it: read a payment's vector, update on events.

`OnlineGateway` wraps the feature pipeline's real-time functions (`features.online`) with a
circuit breaker: when the store fails, scoring answers on the ``request_only`` tier (features
computed from the request alone) with ``degraded: true``, and for ``online_retry_seconds`` does
not even try the store (so a dead Redis costs no connect timeouts), then tries again: recovery
needs no restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("aipic.serving.online")

Vector = dict[str, float | None]


class OnlineStoreDown(RuntimeError):
    """The online store could not be read or written."""


class FeatureSource(Protocol):
    """What serving needs from the feature pipeline (implemented by `features.online`)."""

    def payment_vector(self, payment: Mapping[str, Any], names: Sequence[str]) -> Vector:
        """Stored + request features of a payment being scored (the payment itself included)."""
        ...

    def request_vector(self, payment: Mapping[str, Any]) -> Vector:
        """Features computable from the request alone (no store access)."""
        ...

    def score_payments(
        self, payments: Sequence[Mapping[str, Any]], names: Sequence[Sequence[str]]
    ) -> list[Vector]:
        """For each payment in order: `payment_vector` (with ``names[i]``), then the payment applied
        to the real-time features; one store round trip for the whole batch."""
        ...

    def update_interactions(self, events: Sequence[Mapping[str, Any]]) -> None: ...


@dataclass
class BreakerState:
    down_until: float = 0.0
    failures: int = 0
    last_error: str | None = None


class OnlineGateway:
    """Feature reads/writes with degradation to the request-only tier when the store is down."""

    def __init__(self, source: FeatureSource, retry_seconds: float = 2.0) -> None:
        self.source = source
        self.retry_seconds = retry_seconds
        self._state = BreakerState()
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._state.down_until

    @property
    def last_error(self) -> str | None:
        return self._state.last_error

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._state.failures += 1
            self._state.down_until = time.monotonic() + self.retry_seconds
            self._state.last_error = type(exc).__name__
        # the message of a driver error can contain keys; log the type only
        log.warning(
            "online store unreachable (%s): degraded for %.1fs", type(exc).__name__, self.retry_seconds
        )

    def _ok(self) -> None:
        if self._state.failures:
            with self._lock:
                if self._state.failures:
                    log.info("online store reachable again after %d failures", self._state.failures)
                self._state = BreakerState()

    def payment_vector(self, payment: Mapping[str, Any], names: Sequence[str]) -> Vector | None:
        """The stored vector, or None when the store is down (caller uses the request-only tier)."""
        if not self.up:
            return None
        try:
            vector = self.source.payment_vector(payment, names)
        except Exception as exc:
            self._failed(exc)
            return None
        self._ok()
        return vector

    def request_vector(self, payment: Mapping[str, Any]) -> Vector:
        return self.source.request_vector(payment)

    def score_payments(
        self, payments: Sequence[Mapping[str, Any]], names: Sequence[Sequence[str]]
    ) -> list[Vector] | None:
        """The stored vectors with the payments applied to the real-time features, or None when
        the store is down (the caller answers degraded)."""
        if not self.up:
            return None
        try:
            vectors = self.source.score_payments(payments, names)
        except Exception as exc:
            self._failed(exc)
            return None
        self._ok()
        return vectors

    def update_interactions(self, events: Sequence[Mapping[str, Any]]) -> bool:
        if not self.up:
            return False
        try:
            self.source.update_interactions(events)
        except Exception as exc:
            self._failed(exc)
            return False
        self._ok()
        return True
