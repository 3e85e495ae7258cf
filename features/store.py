"""The two Feast configurations, built from settings, and what is done with them.

* **local** (default): SQLite online store ``<var>/feature_repo/online.db``, DuckDB offline
  store over parquet tables in ``<var>/feature_repo/offline/``, SQL registry in SQLite
  ``<var>/feature_repo/registry.db``; the event state in ``<var>/feature_repo/online_state.db``.
* **production**: ``AIPIC_ONLINE_STORE=redis`` (Redis online store at ``AIPIC_REDIS_URL``,
  event state in the same Redis) and ``AIPIC_FEAST_REGISTRY_URL`` = a PostgreSQL SQLAlchemy
  URL (SQL registry; ``sslmode=disable`` is added for a server on localhost).

``feature_store.yaml`` is (re)written from settings each time the store is opened, so the
configuration never drifts from the environment. ``aipic features build`` = `build_features`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from features.feature_repo import (
    PROFILE_VIEWS,
    feast_objects,
    feature_sets,
    offline_table_path,
)
from features.settings import Settings, get_settings

if TYPE_CHECKING:
    from feast import FeatureStore

    from features.online import EventState

MATERIALIZE_START = dt.datetime(1970, 1, 2, tzinfo=dt.UTC)
MATERIALIZE_END = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)


class StoreError(RuntimeError):
    """The feature store cannot be configured or reached (message says which setting)."""


def offline_dir(settings: Settings) -> Path:
    return settings.feature_repo_dir / "offline"


def configuration_name(settings: Settings) -> str:
    """``local`` or ``production`` (Redis online store and a PostgreSQL registry)."""
    return "production" if settings.online_store == "redis" else "local"


def _redis_connection_string(url: str, settings: Settings | None = None) -> str:
    """``redis://[:pw@]host:port/db`` -> Feast's ``host:port,db=N[,password=pw][,ssl=true]``.

    With ``settings``, the socket timeouts are appended (Feast passes them on to redis-py): a
    Redis that does not answer fails after the timeout instead of hanging the caller.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise StoreError(f"AIPIC_REDIS_URL must start with redis:// (got scheme {parts.scheme!r})")
    out = f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
    db = (parts.path or "/0").lstrip("/") or "0"
    out += f",db={db}"
    if parts.password:
        out += f",password={parts.password}"
    if parts.scheme == "rediss":
        out += ",ssl=true"
    if settings is not None:
        out += f",socket_timeout={settings.redis_socket_timeout}"
        out += f",socket_connect_timeout={settings.redis_socket_connect_timeout}"
    return out


def redis_client(settings: Settings) -> Any:
    """A redis-py client with the configured timeouts and few, immediate retries.

    redis-py's default retries three times with exponential backoff (a refused connection then
    takes about 7 s); serving wants to notice a dead Redis within a timeout or two and degrade.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_socket_connect_timeout,
        retry=Retry(NoBackoff(), settings.redis_retries),
    )


def _registry_url(settings: Settings) -> str:
    url = settings.feast_registry_url
    if url is None:
        return f"sqlite:///{(settings.feature_repo_dir / 'registry.db').resolve()}"
    parts = urlsplit(url)
    if parts.scheme.startswith("postgresql"):
        query = dict(parse_qsl(parts.query))
        if "sslmode" not in query and parts.hostname in ("127.0.0.1", "localhost", "::1"):
            query["sslmode"] = "disable"  # psycopg's default tries TLS a local server lacks
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
    return url


def feature_store_config(settings: Settings) -> dict[str, Any]:
    """The content of ``feature_store.yaml`` for the configured environment."""
    repo = settings.feature_repo_dir.resolve()
    online: dict[str, Any]
    if settings.online_store == "redis":
        online = {
            "type": "redis",
            "connection_string": _redis_connection_string(settings.redis_url, settings),
            # last writer wins: a profile pushed with the same timestamp (a KYC change) must land
            "skip_dedup": True,
        }
    else:
        online = {"type": "sqlite", "path": str(repo / "online.db")}
    return {
        "project": settings.feast_project,
        "provider": "local",
        "registry": {"registry_type": "sql", "path": _registry_url(settings), "cache_ttl_seconds": 60},
        "online_store": online,
        "offline_store": {"type": "duckdb"},
        "entity_key_serialization_version": 3,
    }


def _to_yaml(data: dict[str, Any], indent: int = 0) -> str:
    """Nested dicts of scalars as YAML (scalars JSON-quoted, which YAML reads as-is)."""
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{' ' * indent}{key}:")
            lines.append(_to_yaml(value, indent + 2).rstrip("\n"))
        else:
            lines.append(f"{' ' * indent}{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def write_feature_store_yaml(settings: Settings) -> Path:
    repo = settings.feature_repo_dir
    repo.mkdir(parents=True, exist_ok=True)
    path = repo / "feature_store.yaml"
    text = _to_yaml(feature_store_config(settings))
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def open_feature_store(settings: Settings | None = None) -> FeatureStore:
    """A FeatureStore for the configured environment (writes feature_store.yaml first)."""
    from feast import FeatureStore

    s = settings or get_settings()
    write_feature_store_yaml(s)
    try:
        return FeatureStore(repo_path=str(s.feature_repo_dir.resolve()))
    except Exception as exc:  # registry/driver errors: say which configuration failed
        raise StoreError(
            f"cannot open the {configuration_name(s)} feature store: {type(exc).__name__}: {exc}"
        ) from exc


def open_event_state(settings: Settings | None = None) -> EventState:
    """The online event state next to Feast's online store (SQLite file or the same Redis)."""
    from features.online import RedisEventState, SqliteEventState

    s = settings or get_settings()
    if s.online_store == "redis":
        return RedisEventState(redis_client(s), s.feast_project)
    repo = s.feature_repo_dir
    return SqliteEventState(repo / "online_state.db", s.feast_project, feast_db=repo / "online.db")


def apply_repo(store: FeatureStore, settings: Settings | None = None) -> list[str]:
    """Register every generated object; return their names."""
    s = settings or get_settings()
    objects = feast_objects(offline_dir(s))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="On demand feature view is an experimental feature")
        store.apply(objects.all())
    return [o.name for o in objects.all()]


def materialize_repo(store: FeatureStore, settings: Settings | None = None) -> list[str]:
    """Load the latest row per entity of every online view whose offline table exists."""
    s = settings or get_settings()
    objects = feast_objects(offline_dir(s))
    names = [
        name
        for name, fv in objects.feature_views.items()
        if fv.online and offline_table_path(offline_dir(s), name).exists()
    ]
    if names:
        # Feast prints its progress on stdout: keep stdout for the command's own output
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            store.materialize(MATERIALIZE_START, MATERIALIZE_END, feature_views=names)
    return names


def write_profile_tables(events_dir: Path, out_dir: Path) -> dict[str, int]:
    """Offline sources of the profile views (users, items) from the event tables."""
    import duckdb

    from features.storage import table_path

    out_dir.mkdir(parents=True, exist_ok=True)
    queries = {
        "user_profile": (
            "users",
            "SELECT user_id, epoch_us(signup_time) AS signup_ts, kyc_status, country, is_guest::BIGINT AS is_guest, "
            "signup_time AS event_timestamp FROM read_parquet('{src}')",
        ),
        "item_profile": (
            "items",
            "SELECT item_id, floor(price * 100 + 0.5)::BIGINT AS price_cents, epoch_us(created_time) AS created_ts, "
            "created_time AS event_timestamp FROM read_parquet('{src}')",
        ),
    }
    assert {p.name for p in PROFILE_VIEWS} == set(queries)
    rows: dict[str, int] = {}
    con = duckdb.connect()
    try:
        for view, (table, sql) in queries.items():
            src = table_path(events_dir, table)
            path = offline_table_path(out_dir, view)
            if not src.exists():
                path.unlink(missing_ok=True)
                continue
            tmp = path.with_suffix(".parquet.tmp")
            query = sql.format(src=str(src).replace("'", "''"))
            con.execute(f"COPY ({query}) TO '{str(tmp).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)")
            tmp.replace(path)
            row = con.execute(f"SELECT count(*) FROM read_parquet('{src}')").fetchone()
            rows[view] = int(row[0]) if row else 0
    finally:
        con.close()
    return rows


def build_features(
    events_dir: Path,
    settings: Settings | None = None,
    *,
    on_step: Callable[[str, int, int], None] | None = None,
    load_online_state: bool = True,
) -> dict[str, Any]:
    """`aipic features build`: offline tables of every pipeline, apply, materialise, online state."""
    from features.online import OnlineFeatures, load_state

    s = settings or get_settings()
    started = time.perf_counter()
    out_dir = offline_dir(s)
    summary: dict[str, Any] = {"events": str(events_dir), "configuration": configuration_name(s)}
    for fs in feature_sets():
        if fs.build_offline is not None:
            summary[fs.model] = fs.build_offline(Path(events_dir), out_dir, on_step)
    summary["profiles"] = write_profile_tables(Path(events_dir), out_dir)
    if on_step:
        on_step("feast apply", 0, 3)
    store = open_feature_store(s)
    summary["feast_objects"] = len(apply_repo(store, s))
    if on_step:
        on_step("feast materialize", 1, 3)
    summary["materialized_views"] = materialize_repo(store, s)
    if load_online_state:
        if on_step:
            on_step("online event state", 2, 3)
        online = OnlineFeatures(s, store=store)
        try:
            online.state.clear()
            summary["online_state"] = load_state(online, Path(events_dir))
        finally:
            online.close()
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def teardown_project(store: FeatureStore) -> None:
    """Remove this project's online rows and registry entries (other projects are untouched).

    ``FeatureStore.teardown`` would empty the registry tables of *every* project sharing the
    database, so tests and benchmarks clean up through this instead.
    """
    from feast.errors import ProjectNotFoundException, ProjectObjectNotFoundException

    project = store.project
    views = store.list_feature_views()
    entities = store.list_entities()
    store._get_provider().teardown_infra(project, views, entities)
    # never applied: only the metadata row written when the registry was opened remains
    with contextlib.suppress(ProjectNotFoundException, ProjectObjectNotFoundException):
        store.delete_project(project)
    engine = getattr(store.registry, "write_engine", None)
    if engine is not None:  # SQL registry: that row would bring the project back on the next open
        from feast.infra.registry.sql import feast_metadata, projects
        from sqlalchemy import delete

        with engine.begin() as conn:
            for table in (feast_metadata, projects):
                conn.execute(delete(table).where(table.c.project_id == project))
