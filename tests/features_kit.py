"""Helpers of the feature-pipeline tests: hand-built event tables and an online replay."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.events import Dispute, Item, Payment, User
from features.storage import write_table

T0 = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)  # a Monday, noon


def at(us: int) -> dt.datetime:
    """T0 plus a number of microseconds (exact)."""
    return T0 + dt.timedelta(microseconds=us)


def payment(pid: str, us: int, amount: float = 10.0, user: str = "u1", **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "payment_id": pid,
        "user_id": user,
        "item_ids": [],
        "payment_time": at(us),
        "kind": "purchase",
        "amount": amount,
        "currency": "EUR",
        "card_fingerprint": "fp1",
        "card_bin_country": None,
        "billing_country": None,
        "device_id": None,
        "ip": None,
        "ip_country": None,
        "creator_id": "c1",
        "fraud_pattern": None,
    }
    row.update(kw)
    return row


def user(uid: str, signup_us: int = -90 * 86_400_000_000, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "user_id": uid,
        "signup_time": at(signup_us),
        "date_of_birth": None,
        "country": "DE",
        "kyc_status": "verified",
        "is_guest": False,
    }
    row.update(kw)
    return row


def write_events(
    directory: Path,
    payments: Sequence[dict[str, Any]],
    *,
    users: Sequence[dict[str, Any]] | None = None,
    items: Sequence[dict[str, Any]] | None = None,
    disputes: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """Write validated event tables (users default to every payer, verified, DE)."""
    directory.mkdir(parents=True, exist_ok=True)
    if users is None:
        users = [user(u) for u in sorted({p["user_id"] for p in payments})]
    write_table(pd.DataFrame(list(payments)), directory, "payments")
    write_table(pd.DataFrame(list(users)), directory, "users")
    if items:
        write_table(pd.DataFrame(list(items)), directory, "items")
    if disputes:
        write_table(pd.DataFrame(list(disputes)), directory, "disputes")
    return directory


def event_stream(events_dir: Path) -> list[tuple[dt.datetime, int, str, Any]]:
    """Users, items, disputes and payments of an event directory as models, in time order.

    At equal times: users, items, disputes, then payments (ties by id) — the order the API
    would plausibly see them; the features do not depend on it (strictly-earlier rule).
    """
    out: list[tuple[dt.datetime, int, str, Any]] = []

    def records(table: str) -> list[dict[str, Any]]:
        path = events_dir / f"{table}.parquet"
        if not path.exists():
            return []
        return pd.read_parquet(path).to_dict("records")  # type: ignore[return-value]

    for r in records("users"):
        out.append((r["signup_time"], 0, r["user_id"], User.model_validate(r)))
    for r in records("items"):
        r["tags"] = list(r["tags"])
        out.append((r["created_time"], 1, r["item_id"], Item.model_validate(r)))
    for r in records("disputes"):
        out.append((r["reported_time"], 2, r["dispute_id"], Dispute.model_validate(r)))
    for r in records("payments"):
        r["item_ids"] = list(r["item_ids"])
        out.append((r["payment_time"], 3, r["payment_id"], Payment.model_validate(r)))
    out.sort(key=lambda e: (e[0], e[1], e[2]))
    return out


def compare(
    online: pd.DataFrame, offline: pd.DataFrame, names: Iterable[str], tol: float = 1e-9
) -> list[str]:
    """Differences between two frames indexed by payment id (NaN equals NaN); empty if equal."""
    names = list(names)
    a = online.loc[offline.index, names].to_numpy(dtype=float)
    b = offline[names].to_numpy(dtype=float)
    both_nan = np.isnan(a) & np.isnan(b)
    close = np.isclose(a, b, rtol=tol, atol=tol)
    bad = ~(both_nan | close)
    out = []
    for i, j in zip(*np.nonzero(bad), strict=True):
        out.append(f"{offline.index[i]} {names[j]}: online {a[i, j]!r} offline {b[i, j]!r}")
    return out


def nan_equal(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y


REDIS_URL = "redis://127.0.0.1:6379/0"
ONLINE_BACKENDS = ("sqlite", "redis")


def require_redis() -> None:
    """The real Redis answers; if not, fail in CI (``CI=true``) and skip elsewhere."""
    import pytest
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Redis not reachable in CI: {exc}")
        pytest.skip(f"Redis not reachable: {exc}")


PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def postgres_schema(prepare: Callable[[Any], object]) -> Iterator[Any]:
    """An engine on a fresh schema of the real PostgreSQL server, ``prepare``d (tables created),
    dropped afterwards. A server that does not answer fails the test in CI and skips it elsewhere."""
    import uuid

    import pytest
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL not reachable in CI: {exc}")
        pytest.skip("PostgreSQL not reachable")
    engine = create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    try:
        prepare(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextlib.contextmanager
def online_backend(backend: str, monkeypatch: Any) -> Iterator[Any]:
    """A fresh `OnlineFeatures` on SQLite (the test's var dir) or on the real Redis.

    Redis gets its own Feast project and key prefix (removed afterwards); a Redis that does
    not answer fails the test in CI and skips it elsewhere.
    """
    import uuid

    from features.online import OnlineFeatures
    from features.settings import get_settings
    from features.store import apply_repo, open_feature_store, teardown_project

    if backend == "redis":
        require_redis()
        monkeypatch.setenv("AIPIC_ONLINE_STORE", "redis")
        monkeypatch.setenv("AIPIC_REDIS_URL", REDIS_URL)
        monkeypatch.setenv("AIPIC_FEAST_PROJECT", f"t_{uuid.uuid4().hex[:12]}")
        get_settings.cache_clear()
    s = get_settings()
    store = open_feature_store(s)
    apply_repo(store, s)
    online = OnlineFeatures(s, store=store)
    try:
        yield online
    finally:
        if backend == "redis":
            online.state.clear()
            with contextlib.suppress(Exception):
                teardown_project(store)
        online.close()
        get_settings.cache_clear()
