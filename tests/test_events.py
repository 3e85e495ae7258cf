"""The event model: schemas derive from one definition and validation catches bad rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from features.events import TABLES, Payment, arrow_schema
from features.storage import SchemaError, read_table, write_table


def _payment(**over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "payment_id": "p1",
        "user_id": "u1",
        "item_ids": ["i1"],
        "payment_time": pd.Timestamp("2026-01-01T10:00:00Z"),
        "kind": "purchase",
        "amount": 12.5,
        "currency": "EUR",
        "card_fingerprint": "c1",
        "card_bin_country": "BG",
        "billing_country": "BG",
        "device_id": "d1",
        "ip": "10.0.0.1",
        "ip_country": "BG",
        "creator_id": "cr1",
        "fraud_pattern": None,
    }
    row.update(over)
    return row


def test_every_table_has_a_schema_matching_its_model() -> None:
    for name, model in TABLES.items():
        schema = arrow_schema(model)
        assert schema.names == list(model.model_fields), name
        assert model.key in schema.names


def test_payment_schema_types() -> None:
    schema = arrow_schema(Payment)
    assert schema.field("payment_time").type == pa.timestamp("us", tz="UTC")
    assert schema.field("item_ids").type == pa.list_(pa.string())
    assert schema.field("amount").type == pa.float64()
    assert not schema.field("amount").nullable
    assert schema.field("device_id").nullable


def test_round_trip(tmp_path: Path) -> None:
    df = pd.DataFrame([_payment(), _payment(payment_id="p2", amount=3.0)])
    write_table(df, tmp_path, "payments")
    back = read_table(tmp_path, "payments")
    assert list(back["payment_id"]) == ["p1", "p2"]
    assert back["payment_time"].dt.tz is not None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"amount": -1.0}, "non-negative"),
        ({"amount": float("nan")}, "null values"),
        ({"amount": float("inf")}, "finite"),
        ({"kind": "refund"}, "unknown values"),
        ({"ip_country": "bulgaria"}, "country codes"),
        ({"user_id": None}, "null"),
    ],
)
def test_bad_rows_get_a_clear_error(tmp_path: Path, override: dict[str, object], message: str) -> None:
    df = pd.DataFrame([_payment(**override)])
    with pytest.raises(SchemaError, match=message):
        write_table(df, tmp_path, "payments")
    assert not (tmp_path / "payments.parquet").exists()


def test_duplicate_keys_rejected_and_existing_file_kept(tmp_path: Path) -> None:
    write_table(pd.DataFrame([_payment()]), tmp_path, "payments")
    with pytest.raises(SchemaError, match="duplicate"):
        write_table(pd.DataFrame([_payment(), _payment()]), tmp_path, "payments")
    assert len(read_table(tmp_path, "payments")) == 1


def test_missing_column_named(tmp_path: Path) -> None:
    df = pd.DataFrame([_payment()]).drop(columns=["currency"])
    with pytest.raises(SchemaError, match="currency"):
        write_table(df, tmp_path, "payments")


def test_missing_file_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="aipic data simulate"):
        read_table(tmp_path, "payments")


def test_date_of_birth_is_a_date() -> None:
    from features.events import User

    assert arrow_schema(User).field("date_of_birth").type == pa.date32()
    assert dt.date(2000, 1, 1)
