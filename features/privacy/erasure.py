"""Right to erasure (Art 17): remove a person from every store the service keeps.

Order matters and every step is idempotent, so an interrupted erasure is finished by
running it again:

1. identifiers linked to the person alone (their devices, cards) are collected from the
   offline tables, so online-store rows keyed by them can be found;
2. online stores (`erase_online_entities`): Feast's SQLite and Redis layouts, where rows
   are matched on the serialized entity key (also inside compound keys) since Feast has no
   per-key delete, and the online event state (payment records, disputes, first-seen times);
3. offline parquet files (event tables and any feature table with a ``user_id`` column)
   are rewritten without the person, atomically, or the next materialisation would bring
   the online rows back;
4. service tables (decision logs, reviews, ...) found by reflection: rows with a subject
   column, and rows of tables referencing them;
5. the consent ledger and processing controls; a minimal tombstone is appended (subject id,
   time, counts) under Art 5(2)/Art 17 accountability, kept for a configured period, which
   also stops a later consent import from bringing the person back.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import struct
import uuid
from collections.abc import Collection, Iterable, Mapping
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import ColumnElement, Connection, Engine, MetaData, Table, delete, insert, inspect, select

from features.privacy.inventory import INVENTORY, LINKED_KEYS, SUBJECT_COLUMNS
from features.privacy.ledger import ConsentRecord, ErasureTombstone, ProcessingControl, now_utc
from features.privacy.sqltypes import as_utc
from features.settings import Settings, get_settings

if TYPE_CHECKING:
    from feast import FeatureStore

    from features.online import EventState

PRIVACY_TABLES = frozenset({"consent_ledger", "processing_controls", "erasure_tombstones", "alembic_version"})

TOMBSTONE_LEGAL_BASIS = (
    "GDPR Art 17 erasure carried out. Kept under Art 5(2) and Art 17 accountability: proof that the "
    "request was honoured and suppression so the person is not re-imported from an old source. "
    "Contains only the subject id, the time and row counts; deleted at retain_until."
)


class ErasureError(RuntimeError):
    """An erasure step could not run (bad configuration, unreachable store). Safe to retry."""


@dataclass
class ErasureReport:
    subject_id: str
    erased_at: dt.datetime
    linked_keys: dict[str, int] = field(default_factory=dict)
    online: dict[str, int] = field(default_factory=dict)
    offline: dict[str, int] = field(default_factory=dict)
    service_tables: dict[str, int] = field(default_factory=dict)
    ledger: dict[str, int] = field(default_factory=dict)
    tombstone_receipt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["erased_at"] = self.erased_at.isoformat()
        return out


# --- 1. identifiers linked to the person only ------------------------------------------------


def linked_entity_values(subject_id: str, events_dir: Path) -> dict[str, set[str]]:
    """Entity values to erase online: the person's id and identifiers used by nobody else."""
    out: dict[str, set[str]] = {"user_id": {subject_id}}
    for table in ("payments", "interactions"):
        path = Path(events_dir) / f"{table}.parquet"
        if not path.exists():
            continue
        names = pq.read_schema(path).names
        for key in (k for k in LINKED_KEYS if k in names):
            t = pq.read_table(path, columns=["user_id", key]).drop_null()
            mine = pc.equal(t.column("user_id"), subject_id)
            my_values = pc.unique(t.filter(mine).column(key))
            if len(my_values) == 0:
                continue
            others = t.filter(pc.and_(pc.invert(mine), pc.is_in(t.column(key), value_set=my_values)))
            shared = set(pc.unique(others.column(key)).to_pylist())
            out.setdefault(key, set()).update(v for v in my_values.to_pylist() if v not in shared)
    return out


# --- 2. online stores -------------------------------------------------------------------------


def _value_needle(value: str) -> bytes:
    """The bytes a string entity value occupies inside a Feast v3 serialized entity key."""
    from feast.protos.feast.types.Value_pb2 import ValueType

    raw = value.encode("utf8")
    return struct.pack("<I", ValueType.STRING) + struct.pack("<I", len(raw)) + raw


def _matches(serialized: bytes, targets: Mapping[str, Collection[str]]) -> bool:
    from feast.infra.key_encoding_utils import deserialize_entity_key

    try:
        key = deserialize_entity_key(serialized, entity_key_serialization_version=3)
    except Exception:  # not a Feast v3 key: never ours to delete
        return False
    for name, value in zip(key.join_keys, key.entity_values, strict=False):
        if value.WhichOneof("val") == "string_val" and value.string_val in targets.get(name, ()):
            return True
    return False


def erase_sqlite_online(
    db_path: Path, project: str, targets: Mapping[str, Collection[str]]
) -> dict[str, int]:
    """Delete every row of the project's Feast SQLite tables whose entity key names the person."""
    if not Path(db_path).exists():
        return {}
    needles = [_value_needle(v) for values in targets.values() for v in values]
    try:
        return _erase_sqlite_tables(db_path, project, targets, needles)
    except sqlite3.Error as exc:  # locked or unreadable: nothing half-applied per table, retry later
        raise ErasureError(f"online SQLite store {Path(db_path).name} not writable: {exc}") from exc


def _erase_sqlite_tables(
    db_path: Path, project: str, targets: Mapping[str, Collection[str]], needles: list[bytes]
) -> dict[str, int]:
    deleted: dict[str, int] = {}
    with closing(sqlite3.connect(db_path, timeout=30)) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE ? ESCAPE '\\'",
                (project.replace("_", "\\_") + "\\_%",),
            )
        ]
        for table in tables:
            cols = {r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')}
            if "entity_key" not in cols:
                continue
            candidates: set[bytes] = set()
            for needle in needles:
                rows = conn.execute(
                    f'SELECT DISTINCT entity_key FROM "{table}" WHERE instr(entity_key, ?) > 0', (needle,)
                )
                candidates.update(bytes(r[0]) for r in rows)
            keys = [k for k in candidates if _matches(k, targets)]
            if keys:
                with conn:
                    cur = conn.executemany(
                        f'DELETE FROM "{table}" WHERE entity_key = ?', [(k,) for k in keys]
                    )
                deleted[table] = cur.rowcount
    return deleted


def _glob_escape(raw: bytes) -> bytes:
    out = bytearray()
    for b in raw:
        if b in b"*?[]\\":
            out += b"\\"
        out.append(b)
    return bytes(out)


def redis_client_from_connection_string(connection_string: str) -> Any:
    """A redis-py client from Feast's ``host:port,db=0,password=...,ssl=true`` string."""
    import redis

    parts = [p.strip() for p in connection_string.split(",") if p.strip()]
    hosts = [p for p in parts if "=" not in p]
    params = dict(p.split("=", 1) for p in parts if "=" in p)
    if len(hosts) != 1:
        raise ErasureError("Redis cluster connection strings are not supported for erasure")
    host, _, port = hosts[0].partition(":")
    return redis.Redis(
        host=host,
        port=int(port or 6379),
        db=int(params.get("db", 0)),
        username=params.get("username"),
        password=params.get("password"),
        ssl=params.get("ssl", "false").lower() == "true",
        socket_timeout=float(params["socket_timeout"]) if "socket_timeout" in params else None,
        socket_connect_timeout=(
            float(params["socket_connect_timeout"]) if "socket_connect_timeout" in params else None
        ),
    )


def erase_redis_online(client: Any, project: str, targets: Mapping[str, Collection[str]]) -> int:
    """Delete the person's hashes (one per entity key + project) from a Feast Redis store."""
    suffix = project.encode("utf8")
    keys: set[bytes] = set()
    for values in targets.values():
        for value in values:
            pattern = b"*" + _glob_escape(_value_needle(value)) + b"*" + _glob_escape(suffix)
            for key in client.scan_iter(match=pattern, count=1000):
                raw = bytes(key)
                if raw.endswith(suffix) and _matches(raw[: -len(suffix)], targets):
                    keys.add(raw)
    if not keys:
        return 0
    return int(client.delete(*keys))


def feature_store_config(repo_dir: Path) -> dict[str, Any] | None:
    """The parsed ``feature_store.yaml`` of the repo, or None if there is no repo yet."""
    import importlib

    yaml: Any = importlib.import_module("yaml")  # no type stubs installed
    path = Path(repo_dir) / "feature_store.yaml"
    if not path.exists():
        return None
    text = os.path.expandvars(path.read_text())
    config = yaml.safe_load(text)
    if not isinstance(config, dict) or "project" not in config:
        raise ErasureError(f"{path} has no project: not a Feast repo configuration")
    return config


@dataclass(frozen=True)
class FeastOnline:
    """Where one Feast project keeps its online rows: the ``online_store`` part of its configuration."""

    project: str
    online_store: Mapping[str, Any]
    repo_dir: Path  # relative SQLite paths are relative to the repo, as in Feast

    @classmethod
    def from_repo(cls, repo_dir: Path) -> FeastOnline | None:
        """From the repo's ``feature_store.yaml`` (None if there is no repo yet)."""
        config = feature_store_config(repo_dir)
        if config is None:
            return None
        online = config.get("online_store") or {"type": "sqlite"}
        return cls(str(config["project"]), {"type": online} if isinstance(online, str) else online, repo_dir)

    @classmethod
    def from_store(cls, store: FeatureStore) -> FeastOnline:
        """From an open `FeatureStore` (its in-memory configuration)."""
        cfg = store.config
        return cls(cfg.project, cfg.online_store.model_dump(mode="json"), Path(cfg.repo_path or "."))


def erase_online_entities(
    targets: Mapping[str, Collection[str]], *, feast: FeastOnline | None, state: EventState | None = None
) -> dict[str, int]:
    """Erase every online row keyed by these entity values: Feast's views and the event state.

    The one online-erasure function: `erase_subject` (a person and the identifiers linked to
    them alone) and `features.online.delete_entities` (keys of one entity) both call it.
    ``targets`` maps Feast join keys (``user_id``, ``card_fingerprint``, ...) to values. Feast
    has no per-key delete: rows are matched on their deserialized entity key, compound keys
    (user x item) included. The event state (`features.online.EventState`) drops each entity's
    logs, disputes and first-seen times and every payment record that names it. Returns the
    rows removed per store: ``sqlite:<table>`` or ``redis``, and ``state``.
    """
    from features.feature_repo import ENTITY_JOIN_KEYS

    out: dict[str, int] = {}
    if feast is not None:
        out.update(_erase_feast_online(targets, feast))
    if state is not None:
        entity_of = {join_key: entity for entity, join_key in ENTITY_JOIN_KEYS.items()}
        n = 0
        for join_key, values in targets.items():
            if join_key in entity_of and values:
                n += state.delete(entity_of[join_key], sorted(values))
        out["state"] = n
    return out


def _erase_feast_online(targets: Mapping[str, Collection[str]], feast: FeastOnline) -> dict[str, int]:
    online = feast.online_store
    kind = str(online.get("type", "sqlite"))
    if kind.endswith("sqlite") or kind.endswith("SqliteOnlineStore"):
        path = Path(str(online.get("path", "data/online.db")))
        db = path if path.is_absolute() else Path(feast.repo_dir) / path
        return {f"sqlite:{t}": n for t, n in erase_sqlite_online(db, feast.project, targets).items()}
    if kind.endswith("redis") or kind.endswith("RedisOnlineStore"):
        if str(online.get("redis_type", "redis")) != "redis":
            raise ErasureError("only a single Redis server is supported for erasure (not cluster/sentinel)")
        client = redis_client_from_connection_string(str(online.get("connection_string", "localhost:6379")))
        try:
            return {"redis": erase_redis_online(client, feast.project, targets)}
        except Exception as exc:  # connection refused, auth: report clearly, the step is retryable
            raise ErasureError(f"Redis online store unreachable: {type(exc).__name__}") from exc
        finally:
            client.close()
    raise ErasureError(f"online store type {kind!r} has no erasure implementation")


def _open_event_state(settings: Settings) -> EventState | None:
    """The configured event state, or None if this installation never wrote one (SQLite file absent)."""
    from features.store import open_event_state

    if settings.online_store != "redis" and not (settings.feature_repo_dir / "online_state.db").exists():
        return None
    try:
        return open_event_state(settings)
    except Exception as exc:  # unreachable Redis, unreadable file: retry later
        raise ErasureError(f"online event state unreachable: {type(exc).__name__}") from exc


# --- 3. offline parquet files -----------------------------------------------------------------


def _parquet_files(directories: Iterable[Path]) -> list[Path]:
    seen: dict[Path, None] = {}
    for d in directories:
        if Path(d).exists():
            for p in sorted(Path(d).rglob("*.parquet")):
                seen[p.resolve()] = None
    return list(seen)


def atomic_write_parquet(table: pa.Table, path: Path) -> None:
    """Write next to the target then rename: readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def rewrite_without(path: Path, subject_id: str, payment_ids: pa.Array | None) -> int:
    """Remove (or unlink) the person's rows in one parquet file; return how many rows changed."""
    names = pq.read_schema(path).names
    subject_cols = [c for c in SUBJECT_COLUMNS if c in names]
    by_payment = payment_ids is not None and len(payment_ids) > 0 and "payment_id" in names
    if not subject_cols and not by_payment:
        return 0
    table = pq.read_table(path)
    hit = pa.array([False] * table.num_rows, type=pa.bool_())
    for c in subject_cols:
        hit = pc.or_(hit, pc.fill_null(pc.equal(table.column(c), subject_id), False))
    if by_payment:
        hit = pc.or_(hit, pc.fill_null(pc.is_in(table.column("payment_id"), value_set=payment_ids), False))
    changed = int(pc.sum(hit).as_py() or 0)
    if not changed:
        return 0
    spec = INVENTORY.get(path.stem)
    if spec is not None and spec.on_erasure == "unlink" and spec.subject_column in names:
        col = table.column(spec.subject_column)
        idx = names.index(spec.subject_column)
        unlinked = pc.if_else(hit, pa.scalar(None, type=col.type), col)
        table = table.set_column(idx, table.schema.field(idx), unlinked)
    else:
        table = table.filter(pc.invert(hit))
    atomic_write_parquet(table, path)
    return changed


def person_payment_ids(subject_id: str, events_dir: Path) -> pa.Array:
    path = Path(events_dir) / "payments.parquet"
    if not path.exists():
        return pa.array([], type=pa.string())
    t = pq.read_table(path, columns=["user_id", "payment_id"])
    return pc.unique(
        t.filter(pc.fill_null(pc.equal(t.column("user_id"), subject_id), False)).column("payment_id")
    )


def erase_offline(subject_id: str, directories: Iterable[Path], events_dir: Path) -> dict[str, int]:
    """Rewrite every parquet file under ``directories`` without the person."""
    payment_ids = person_payment_ids(subject_id, events_dir)
    out: dict[str, int] = {}
    for path in _parquet_files(directories):
        n = rewrite_without(path, subject_id, payment_ids)
        if n:
            out[str(path)] = n
    return out


# --- 4. service tables ------------------------------------------------------------------------


def service_tables(engine: Engine) -> dict[str, Table]:
    """Every table of the service database except the privacy tables, reflected."""
    meta = MetaData()
    names = [t for t in inspect(engine).get_table_names() if t not in PRIVACY_TABLES]
    return {n: Table(n, meta, autoload_with=engine) for n in names}


def delete_with_dependents(
    conn: Connection, tables: Mapping[str, Table], table: Table, where: ColumnElement[bool]
) -> dict[str, int]:
    """Delete rows of ``table`` and first the rows of other tables referencing them.

    Done explicitly rather than relying on ``ON DELETE CASCADE``, which SQLite only honours
    when foreign keys are switched on for the connection.
    """
    out: dict[str, int] = {}
    for child_name, child in tables.items():
        if child is table:
            continue
        for fk in child.foreign_keys:
            if fk.column.table is table:
                n = conn.execute(delete(child).where(fk.parent.in_(select(fk.column).where(where)))).rowcount
                if n:
                    out[child_name] = out.get(child_name, 0) + n
    n = conn.execute(delete(table).where(where)).rowcount
    if n:
        out[table.name] = out.get(table.name, 0) + n
    return out


def erase_service_tables(subject_id: str, engine: Engine) -> dict[str, int]:
    """Delete the person's rows from every service table with a subject column (and dependents)."""
    tables = service_tables(engine)
    out: dict[str, int] = {}
    with engine.begin() as conn:
        for table in tables.values():
            subject_col = next((c for c in SUBJECT_COLUMNS if c in table.c), None)
            if subject_col is None:
                continue
            for name, n in delete_with_dependents(
                conn, tables, table, table.c[subject_col] == subject_id
            ).items():
                out[name] = out.get(name, 0) + n
    return out


# --- 5. ledger and tombstone ------------------------------------------------------------------


def erase_ledger(
    subject_id: str, engine: Engine, summary: Mapping[str, Any], now: dt.datetime, settings: Settings
) -> tuple[dict[str, int], str]:
    """Delete consent and control records; append the tombstone in the same transaction."""
    receipt = f"er-{uuid.uuid4()}"
    with engine.begin() as conn:
        counts = {
            "consent_ledger": conn.execute(
                delete(ConsentRecord).where(ConsentRecord.subject_id == subject_id)
            ).rowcount,
            "processing_controls": conn.execute(
                delete(ProcessingControl).where(ProcessingControl.subject_id == subject_id)
            ).rowcount,
        }
        conn.execute(
            insert(ErasureTombstone),
            [
                {
                    "receipt_id": receipt,
                    "subject_id": subject_id,
                    "erased_at": now,
                    "retain_until": now + dt.timedelta(days=settings.erasure_tombstone_retention_days),
                    "legal_basis": TOMBSTONE_LEGAL_BASIS,
                    "summary": {**summary, **{f"ledger:{k}": v for k, v in counts.items()}},
                }
            ],
        )
    return counts, receipt


def erase_subject(
    subject_id: str,
    *,
    engine: Engine | None = None,
    settings: Settings | None = None,
    events_dir: Path | None = None,
    offline_dirs: Iterable[Path] | None = None,
    repo_dir: Path | None = None,
    now: dt.datetime | None = None,
) -> ErasureReport:
    """Erase the person everywhere (see module docstring); returns counts per store."""
    if not subject_id:
        raise ErasureError("subject id must not be empty")
    s = settings or get_settings()
    if engine is None:
        from features.db import get_engine

        engine = get_engine()
    events = Path(events_dir or s.events_dir)
    repo = Path(repo_dir or s.feature_repo_dir)
    dirs = list(offline_dirs) if offline_dirs is not None else [s.data_dir, events, repo]
    when = as_utc(now or now_utc())
    report = ErasureReport(subject_id=subject_id, erased_at=when)

    targets = linked_entity_values(subject_id, events)
    report.linked_keys = {k: len(v) for k, v in targets.items()}
    state = _open_event_state(s)
    try:
        report.online = erase_online_entities(targets, feast=FeastOnline.from_repo(repo), state=state)
    except ErasureError:
        raise
    except Exception as exc:  # the event state's server went away mid-way: the step is retryable
        raise ErasureError(f"online event state not erasable: {type(exc).__name__}") from exc
    finally:
        if state is not None:
            state.close()
    report.offline = {Path(p).name: n for p, n in erase_offline(subject_id, dirs, events).items()}
    report.service_tables = erase_service_tables(subject_id, engine)
    summary = {
        "online_rows": sum(report.online.values()),
        "offline_rows": sum(report.offline.values()),
        "service_rows": sum(report.service_tables.values()),
    }
    report.ledger, report.tombstone_receipt = erase_ledger(subject_id, engine, summary, when, s)
    return report
