"""Rate limits per API key and per person (the `limits` library, in-process memory).

Memory storage matches the one-worker deployment; with several workers or hosts point
`limits` at Redis instead (``limits.storage.RedisStorage``) - the calls stay the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter


class RateLimitConfigError(ValueError):
    """A rate-limit string that `limits` cannot parse."""


def _parse(spec: str) -> list[RateLimitItem]:
    try:
        items = parse_many(spec)
    except ValueError as exc:
        raise RateLimitConfigError(
            f"bad rate limit {spec!r}: {exc} (e.g. '2000/second;50000/minute')"
        ) from None
    if not items:
        raise RateLimitConfigError(f"bad rate limit {spec!r}")
    return list(items)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0


class RateLimiter:
    """One fixed-window limiter; separate budgets for keys and for people."""

    def __init__(self, key_limit: str, person_limit: str) -> None:
        self._limiter = FixedWindowRateLimiter(MemoryStorage())
        self._limits = {"key": _parse(key_limit), "person": _parse(person_limit)}

    def hit(self, kind: str, identity: str) -> Verdict:
        for item in self._limits[kind]:
            if not self._limiter.hit(item, kind, identity):
                stats = self._limiter.get_window_stats(item, kind, identity)
                return Verdict(False, max(1, int(stats.reset_time - time.time()) + 1))
        return Verdict(True)
