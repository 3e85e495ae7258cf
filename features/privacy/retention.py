"""Storage limitation (Art 5(1)(e)): delete or anonymise what is past its retention period.

Retention is configured per fideslang data category (``AIPIC_RETENTION_DAYS``, the longest
matching key wins, null means no limit) and per service table
(``AIPIC_SERVICE_TABLE_RETENTION_DAYS``). For each offline table of the inventory, rows
older than their row category's retention are deleted and columns whose own category has a
shorter retention are nulled (anonymised) on older rows. In the ledger, consent records and
processing controls past retention are deleted unless they are still the current state of
their subject and purpose (the latest record is what proves today's status); tombstones go
at their ``retain_until``. Online SQLite rows older than the shortest retention of their
feature's categories are deleted; Redis relies on the Feast ``key_ttl_seconds`` setting.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import Engine, bindparam, delete, func, select

from features.definitions import FeatureDef
from features.privacy.erasure import (
    atomic_write_parquet,
    delete_with_dependents,
    feature_store_config,
    service_tables,
)
from features.privacy.inventory import INVENTORY, TableSpec
from features.privacy.ledger import ConsentRecord, ErasureTombstone, ProcessingControl, now_utc
from features.privacy.registry import within
from features.privacy.sqltypes import UTCDateTime, as_utc
from features.settings import Settings, get_settings

TIME_COLUMNS = ("decided_at", "created_at", "event_time", "recorded_at", "time", "timestamp")


def retention_days(category: str, settings: Settings | None = None) -> int | None:
    """Days ``category`` is kept: the most specific configured key covering it (None: no limit)."""
    table = (settings or get_settings()).retention_days
    matches = [k for k in table if within(category, k)]
    if not matches:
        return None
    return table[max(matches, key=len)]


@dataclass
class RetentionReport:
    now: dt.datetime
    dry_run: bool
    offline_rows_deleted: dict[str, int] = field(default_factory=dict)
    offline_values_anonymised: dict[str, int] = field(default_factory=dict)
    ledger_rows_deleted: dict[str, int] = field(default_factory=dict)
    service_rows_deleted: dict[str, int] = field(default_factory=dict)
    online_rows_deleted: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["now"] = self.now.isoformat()
        return out


def _cutoff(now: dt.datetime, days: int | None) -> pa.Scalar | None:
    if days is None:
        return None
    return pa.scalar(now - dt.timedelta(days=days), type=pa.timestamp("us", tz="UTC"))


def _keep_latest(table: pa.Table, keys: Sequence[str], time_col: str) -> pa.Array:
    """Boolean mask of rows that are the latest per ``keys`` (current state must survive)."""
    df = table.select([*keys, time_col]).to_pandas()
    df["_pos"] = range(len(df))
    last = df.sort_values(time_col, kind="mergesort").groupby(list(keys), sort=False)["_pos"].last()
    mask = pd.Series(False, index=df.index)
    mask.iloc[last.to_numpy()] = True
    return pa.array(mask.to_numpy())


def enforce_table(
    path: Path, spec: TableSpec, now: dt.datetime, settings: Settings, dry_run: bool
) -> tuple[int, int]:
    """Apply retention to one offline table; returns (rows deleted, values anonymised)."""
    table = pq.read_table(path)
    times = table.column(spec.time_column)
    if not pa.types.is_timestamp(times.type):
        return 0, 0
    times = pc.cast(times, pa.timestamp("us", tz="UTC"))
    row_cut = _cutoff(now, retention_days(spec.row_category, settings))
    drop = pa.array([False] * table.num_rows, type=pa.bool_())
    if row_cut is not None:
        drop = pc.fill_null(pc.less(times, row_cut), False)
        if spec.keep_latest_by:
            drop = pc.and_(drop, pc.invert(_keep_latest(table, spec.keep_latest_by, spec.time_column)))
    anonymised = 0
    for col, category in spec.columns.items():
        cut = _cutoff(now, retention_days(category, settings))
        if cut is None or col not in table.column_names:
            continue
        values = table.column(col)
        old = pc.and_(pc.fill_null(pc.less(times, cut), False), pc.is_valid(values))
        old = pc.and_(old, pc.invert(drop))
        n = int(pc.sum(old).as_py() or 0)
        if n:
            anonymised += n
            idx = table.column_names.index(col)
            table = table.set_column(
                idx, table.schema.field(idx), pc.if_else(old, pa.scalar(None, values.type), values)
            )
    deleted = int(pc.sum(drop).as_py() or 0)
    if (deleted or anonymised) and not dry_run:
        atomic_write_parquet(table.filter(pc.invert(drop)), path)
    return deleted, anonymised


def _superseded_and_old(
    engine: Engine,
    model: type[ConsentRecord] | type[ProcessingControl],
    keys: Sequence[str],
    cutoff: dt.datetime,
) -> list[int]:
    """Ids of records older than ``cutoff`` that are not the latest of their group."""
    cols = [model.__table__.c[k] for k in ("id", "event_time", *keys)]
    with engine.connect() as conn:
        df = pd.DataFrame(conn.execute(select(*cols)).all(), columns=["id", "event_time", *keys])
    if df.empty:
        return []
    df["event_time"] = pd.to_datetime(df["event_time"], utc=True)
    latest = df.sort_values(["event_time", "id"]).groupby(list(keys))["id"].transform("last").sort_index()
    old = df["event_time"] < pd.Timestamp(cutoff)
    return [int(i) for i in df.loc[old & (df["id"] != latest), "id"]]


def enforce_ledger(engine: Engine, now: dt.datetime, settings: Settings, dry_run: bool) -> dict[str, int]:
    out: dict[str, int] = {}
    days = retention_days("user.privacy_preferences", settings)
    if days is not None:
        cutoff = now - dt.timedelta(days=days)
        for model, keys in (
            (ConsentRecord, ("subject_id", "purpose")),
            (ProcessingControl, ("subject_id", "kind", "scope")),
        ):
            ids = _superseded_and_old(engine, model, keys, cutoff)
            if ids and not dry_run:
                with engine.begin() as conn:
                    for start in range(0, len(ids), 500):
                        conn.execute(delete(model).where(model.id.in_(ids[start : start + 500])))
            out[model.__tablename__] = len(ids)
    with engine.begin() as conn:
        expired = select(ErasureTombstone.id).where(ErasureTombstone.retain_until < now)
        ids = [int(i) for i in conn.execute(expired).scalars()]
        if ids and not dry_run:
            conn.execute(delete(ErasureTombstone).where(ErasureTombstone.id.in_(ids)))
    out["erasure_tombstones"] = len(ids)
    return out


def enforce_service_tables(
    engine: Engine, now: dt.datetime, table_days: Mapping[str, int], dry_run: bool
) -> tuple[dict[str, int], list[str]]:
    """Delete rows of service tables (decision logs, ...) older than their configured retention,
    with the rows that reference them (reviews of a deleted decision)."""
    tables = service_tables(engine)
    out: dict[str, int] = {}
    notes: list[str] = []
    for name, days in table_days.items():
        table = tables.get(name)
        if table is None:
            continue
        time_col = next((c for c in TIME_COLUMNS if c in table.c), None)
        if time_col is None:
            notes.append(f"{name}: no time column among {TIME_COLUMNS}; not enforced")
            continue
        # bound through UTCDateTime: SQLAlchemy formats it, so sqlite3 adapters (Feast registers
        # an epoch adapter globally) never see a raw datetime
        old = table.c[time_col] < bindparam("cutoff", now - dt.timedelta(days=days), type_=UTCDateTime())
        with engine.begin() as conn:
            if dry_run:
                out[name] = int(conn.execute(select(func.count()).select_from(table).where(old)).scalar_one())
                continue
            deleted = delete_with_dependents(conn, tables, table, old)
        out[name] = deleted.pop(name, 0)
        for child, n in deleted.items():
            out[child] = out.get(child, 0) + n
    return out, notes


def enforce_online_sqlite(
    repo_dir: Path, features: Iterable[FeatureDef], now: dt.datetime, settings: Settings, dry_run: bool
) -> dict[str, int]:
    """Delete online SQLite feature values older than their categories' shortest retention."""
    config = feature_store_config(repo_dir)
    if config is None:
        return {}
    online = config.get("online_store") or {"type": "sqlite"}
    online = {"type": online} if isinstance(online, str) else online
    if not str(online.get("type", "sqlite")).endswith("sqlite"):
        return {}
    path = Path(str(online.get("path", "data/online.db")))
    db = path if path.is_absolute() else Path(repo_dir) / path
    if not db.exists():
        return {}
    by_days: dict[int, list[str]] = {}
    for f in features:
        limits = [d for d in (retention_days(c, settings) for c in f.categories) if d is not None]
        if limits:
            by_days.setdefault(min(limits), []).append(f.name)
    out: dict[str, int] = {}
    project = str(config["project"])
    with closing(sqlite3.connect(db)) as conn:
        tables = [
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if r[0].startswith(project + "_")
        ]
        for table in tables:
            for days, names in by_days.items():
                cutoff = now - dt.timedelta(days=days)
                marks = ",".join("?" * len(names))
                where = (
                    f"feature_name IN ({marks}) AND ((typeof(event_ts) = 'integer' AND event_ts < ?) "
                    "OR (typeof(event_ts) = 'text' AND event_ts < ?))"
                )
                params = [*names, int(cutoff.timestamp()), cutoff.replace(tzinfo=None).isoformat()]
                if dry_run:
                    n = conn.execute(f'SELECT count(*) FROM "{table}" WHERE {where}', params).fetchone()[0]
                else:
                    with conn:
                        n = conn.execute(f'DELETE FROM "{table}" WHERE {where}', params).rowcount
                if n:
                    out[table] = out.get(table, 0) + int(n)
    return out


def enforce_retention(
    *,
    now: dt.datetime | None = None,
    engine: Engine | None = None,
    settings: Settings | None = None,
    events_dir: Path | None = None,
    repo_dir: Path | None = None,
    features: Iterable[FeatureDef] | None = None,
    dry_run: bool = False,
) -> RetentionReport:
    """Apply every retention rule once; ``dry_run`` counts without changing anything."""
    s = settings or get_settings()
    when = as_utc(now or now_utc())
    if engine is None:
        from features.db import get_engine

        engine = get_engine()
    report = RetentionReport(now=when, dry_run=dry_run)
    events = Path(events_dir or s.events_dir)
    for name, spec in INVENTORY.items():
        path = events / f"{name}.parquet"
        if not path.exists():
            continue
        deleted, anonymised = enforce_table(path, spec, when, s, dry_run)
        report.offline_rows_deleted[name] = deleted
        report.offline_values_anonymised[name] = anonymised
    report.ledger_rows_deleted = enforce_ledger(engine, when, s, dry_run)
    report.service_rows_deleted, notes = enforce_service_tables(
        engine, when, s.service_table_retention_days, dry_run
    )
    report.notes.extend(notes)
    if features is None:
        from features.privacy.registry import RegistryError, declared_features

        try:
            features = declared_features()
        except RegistryError:
            features = []
            report.notes.append("no ALL_FEATURES declared: online store retention skipped")
    report.online_rows_deleted = enforce_online_sqlite(
        Path(repo_dir or s.feature_repo_dir), features, when, s, dry_run
    )
    report.notes.append(
        "Derived offline feature tables are rebuilt from the event tables; "
        "Redis online rows expire through Feast key_ttl_seconds."
    )
    return report
