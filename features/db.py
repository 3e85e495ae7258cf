"""The service's own relational tables (consent ledger, decision log, keys, reviews).

SQLite under var/ by default, PostgreSQL in production; one declarative Base so Alembic
sees every table. Engines are created on demand, never at import time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from features.settings import get_settings


def json_dumps(value: Any) -> str:
    """JSON columns' serializer: orjson (a decision row's vector, consent snapshot and output cost
    about a tenth of `json.dumps`); anything orjson refuses (non-string keys, ...) goes to
    `json.dumps`. NaN becomes null in both paths that reach the database (JSON has no NaN)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    except TypeError:
        return json.dumps(value)


class Base(DeclarativeBase):
    """Declarative base of every table the service owns."""


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One pooled engine per URL; SQLite gets WAL and foreign keys."""
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        eng = create_engine(url, connect_args={"check_same_thread": False}, json_serializer=json_dumps)

        @event.listens_for(eng, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return eng
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, json_serializer=json_dumps)


T = TypeVar("T")


def retry_if_connection_died(work: Callable[[], T]) -> T:
    """``work()``, run once more if it failed because its pooled connection was dead.

    For engines without a ping per checkout (the API's): SQLAlchemy marks the error
    ``connection_invalidated`` and discards the pool, so the second run gets a fresh connection.
    Any other error, or a second failure, is raised.
    """
    try:
        return work()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    return work()


def on_psycopg(engine: Engine) -> bool:
    """Whether `on_driver_cursor` and SQL compiled for PostgreSQL apply to ``engine``."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"


def on_driver_cursor(engine: Engine, work: Callable[[Any], T]) -> T:
    """``work(cursor)`` on a pooled connection of ``engine``, straight on the driver, in autocommit.

    For the API's per-request statements on PostgreSQL (the consent read, the decision-log
    insert): their SQL is compiled once from the SQLAlchemy tables, and SQLAlchemy's per-execution
    work (connection wrapper, compiled-cache lookup, parameter and result processing) cost more CPU
    than the round trip itself (a one-person consent read: 0.130 against 0.066 ms of CPU). A lone
    statement needs no BEGIN/COMMIT: PostgreSQL runs it, or a psycopg ``executemany`` pipeline,
    as one implicit transaction. A dead pooled connection is found by using it: as SQLAlchemy does
    on a disconnect, every pooled connection of that age is discarded and the work is tried once
    more on a fresh one.
    """
    for attempt in (1, 2):
        raw = engine.raw_connection()
        driver: Any = raw.driver_connection
        try:
            driver.autocommit = True
            with driver.cursor() as cur:
                return work(cur)
        except engine.dialect.loaded_dbapi.Error as exc:
            dead = engine.dialect.is_disconnect(exc, driver, None)
            if dead:
                engine.pool._invalidate(raw, exc)  # what SQLAlchemy's own execution path does
            if attempt == 2 or not dead:
                # the same exception classes as SQLAlchemy's path (IntegrityError, ...), without
                # the statement's parameters (they carry personal data)
                raise DBAPIError.instance(
                    None,
                    None,
                    exc,
                    engine.dialect.loaded_dbapi.Error,
                    hide_parameters=True,
                    connection_invalidated=dead,
                    dialect=engine.dialect,
                ) from exc
        finally:
            if raw.is_valid:
                try:
                    driver.autocommit = False  # what the pool's other users expect
                except Exception:
                    raw.invalidate()
            raw.close()
    raise AssertionError("unreachable")


def get_engine() -> Engine:
    return engine_for(get_settings().resolved_database_url)


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    return sessionmaker(engine or get_engine(), expire_on_commit=False)
