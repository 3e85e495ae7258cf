"""The rate limiter: budgets per identity and kind, and no thread per request."""

from __future__ import annotations

import threading
import time

import pytest
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from serving.ratelimit import InlineExpiryMemoryStorage, RateLimitConfigError, RateLimiter


def test_each_identity_and_kind_has_its_own_budget() -> None:
    limiter = RateLimiter("2/minute", "1/minute")
    assert [limiter.hit("key", "k1").allowed for _ in range(3)] == [True, True, False]
    denied = limiter.hit("key", "k1")
    assert not denied.allowed and 1 <= denied.retry_after <= 61
    assert limiter.hit("key", "k2").allowed  # another key
    assert limiter.hit("person", "k1").allowed  # a person of the same id: the person budget
    assert not limiter.hit("person", "k1").allowed


def _thread_starts(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    started: list[threading.Thread] = []
    original = threading.Thread.start

    def counting(self: threading.Thread) -> None:
        started.append(self)
        original(self)

    monkeypatch.setattr(threading.Thread, "start", counting)
    return started


def test_hits_start_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """`limits`' own memory storage starts a timer thread on hits; ours must not (if a new
    `limits` renames the private scheduler it overrides, this fails)."""
    plain = FixedWindowRateLimiter(MemoryStorage())
    ours = RateLimiter("1000/second", "1000/second")
    started = _thread_starts(monkeypatch)
    for i in range(20):
        plain.hit(ours._limits["key"][0], "key", f"k{i}")
        time.sleep(0.012)  # past the base class's 10 ms timer
    assert started, "the canary: the library's storage starts threads on hits"
    started.clear()
    for i in range(20):
        assert ours.hit("key", f"k{i}").allowed
        time.sleep(0.012)
    assert started == []


def test_counters_of_identities_that_stopped_calling_are_swept(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = InlineExpiryMemoryStorage(sweep_seconds=0.0)
    limiter = FixedWindowRateLimiter(storage)
    (item,) = RateLimiter("5/second", "5/second")._limits["key"]
    for who in ("gone-1", "gone-2"):
        assert limiter.hit(item, "key", who)
    assert len(storage.storage) == 2
    later = time.time() + 5
    monkeypatch.setattr(time, "time", lambda: later)  # both windows are over
    assert limiter.hit(item, "key", "still-here")
    assert list(storage.storage) == [item.key_for("key", "still-here")]
    assert not storage.expirations.keys() - {item.key_for("key", "still-here")}


def test_a_bad_limit_is_a_clear_error() -> None:
    with pytest.raises(RateLimitConfigError, match="bad rate limit"):
        RateLimiter("lots", "1/second")
