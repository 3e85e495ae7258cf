"""The service's own relational tables (consent ledger, decision log, keys, reviews).

SQLite under var/ by default, PostgreSQL in production; one declarative Base so Alembic
sees every table. Engines are created on demand, never at import time.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
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


def get_engine() -> Engine:
    return engine_for(get_settings().resolved_database_url)


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    return sessionmaker(engine or get_engine(), expire_on_commit=False)
