"""Parquet storage of the event model, with vectorised validation against the schemas."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.events import TABLES, EventTable, arrow_schema, enum_columns

MONEY_COLUMNS = {"amount", "price"}
COUNTRY_COLUMNS = {"country", "ip_country", "card_bin_country", "billing_country"}


class SchemaError(ValueError):
    """A table does not match the event model. The message says which column and why."""


def to_arrow(df: pd.DataFrame, table: str) -> pa.Table:
    """Convert a frame to the table's arrow schema and validate it, or raise SchemaError."""
    model = _model(table)
    schema = arrow_schema(model)
    missing = [c for c in schema.names if c not in df.columns]
    extra = [c for c in df.columns if c not in schema.names]
    if missing or extra:
        raise SchemaError(f"{table}: missing columns {missing}, unexpected columns {extra}")
    try:
        at = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise SchemaError(f"{table}: cannot convert to schema: {exc}") from exc
    validate(at, model)
    return at.replace_schema_metadata(None)


def validate(at: pa.Table, model: type[EventTable]) -> None:
    """Check nullability, vocabularies, money and country codes with vectorised compute."""
    name = model.table
    schema = arrow_schema(model)
    for f in schema:
        col = at.column(f.name)
        if not f.nullable and col.null_count:
            raise SchemaError(f"{name}.{f.name}: {col.null_count} null values in a required column")
    for col_name, allowed in enum_columns(model).items():
        values = set(pc.unique(at.column(col_name)).to_pylist()) - {None}
        bad = values - allowed
        if bad:
            raise SchemaError(
                f"{name}.{col_name}: unknown values {sorted(bad)[:5]}; allowed {sorted(allowed)}"
            )
    for col_name in MONEY_COLUMNS & set(schema.names):
        col = at.column(col_name)
        finite = pc.is_finite(col)
        if pc.any(pc.invert(finite)).as_py() or pc.any(pc.less(col, 0)).as_py():
            raise SchemaError(f"{name}.{col_name}: amounts must be finite and non-negative")
    for col_name in COUNTRY_COLUMNS & set(schema.names):
        col = at.column(col_name)
        ok = pc.match_substring_regex(col, r"^[A-Z]{2}$")
        if pc.any(pc.invert(pc.fill_null(ok, True))).as_py():
            raise SchemaError(f"{name}.{col_name}: country codes must be two upper-case letters")
    key = model.key
    if pc.count_distinct(at.column(key)).as_py() != at.num_rows:
        raise SchemaError(f"{name}.{key}: duplicate keys")


def write_table(df: pd.DataFrame, directory: Path, table: str) -> Path:
    """Validate and write one table atomically (temp file then rename: nothing half-written)."""
    at = to_arrow(df, table)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{table}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(at, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def read_table(directory: Path, table: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read one table; a missing file is a clear error naming what to run."""
    _model(table)
    path = Path(directory) / f"{table}.parquet"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run `aipic data simulate --out {directory}` or `aipic data import ...` first"
        )
    # pandas metadata is ignored: the arrow schema is the contract, whoever wrote the file
    return pq.read_table(path, columns=columns).to_pandas(ignore_metadata=True)


def table_path(directory: Path, table: str) -> Path:
    _model(table)
    return Path(directory) / f"{table}.parquet"


def _model(table: str) -> type[EventTable]:
    try:
        return TABLES[table]
    except KeyError:
        raise SchemaError(f"unknown table {table!r}; known: {sorted(TABLES)}") from None
