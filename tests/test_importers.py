"""The real-data importers: counts against the data sets' README, mapping rules, bad input, CLI.

The two real imports run once per module (module-scoped fixtures, one xdist group each);
everything else uses tiny hand-made parquet files.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from features.events import TABLES
from features.importers import (
    RETAIL_COUNTRIES,
    DataImportError,
    handbook_numeric_id,
    import_fraud_handbook,
    import_online_retail,
)
from features.storage import read_table
from serving.cli import app
from tests.conftest import shared_file

ISO_CODES = {c for c in RETAIL_COUNTRIES.values() if c is not None}


def _import_once(
    factory: pytest.TempPathFactory, name: str, run: Callable[[Path], dict[str, Any]]
) -> tuple[dict[str, Any], Path]:
    """Run a real import once per pytest run, shared by every xdist worker (file lock).

    `xdist_group` alone does not keep the tests on one worker: with pytest 9.2 and
    pytest-xdist 3.8, `--dist loadgroup` silently behaves like `load`.
    """
    base = factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out, done = root / f"import-{name}", root / f"import-{name}.json"
    with (root / f"import-{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            done.write_text(json.dumps(run(out)))
    return json.loads(done.read_text()), out


# --------------------------------------------------------------------------- fraud-handbook, real file

HB_SCENARIOS = {0: "none", 1: "handbook_amount", 2: "handbook_terminal", 3: "handbook_card"}


@pytest.fixture(scope="module")
def handbook(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One import of the 1.6M-row file shared by every handbook test.

    Source and payments are both ordered by transaction id, so tests compare arrays row by row.
    """
    source = shared_file("fraud-handbook", "transactions.parquet")
    summary, out = _import_once(tmp_path_factory, "handbook", lambda out: import_fraud_handbook(source, out))
    src = pq.read_table(source).to_pandas().sort_values("TRANSACTION_ID", ignore_index=True)
    columns = [
        "payment_id",
        "user_id",
        "card_fingerprint",
        "creator_id",
        "payment_time",
        "amount",
        "fraud_pattern",
    ]
    pay = read_table(out, "payments", columns=[*columns, "currency", "kind"])
    pay["tx"] = handbook_numeric_id(pay["payment_id"])
    pay = pay.sort_values("tx", ignore_index=True)
    return {"summary": summary, "out": out, "source": src, "payments": pay}


@pytest.mark.xdist_group(name="handbook")
def test_handbook_counts_match_the_readme(handbook: dict[str, Any]) -> None:
    s, out = handbook["summary"], handbook["out"]
    assert s["rows"]["payments"] == len(handbook["payments"]) == 1_600_653
    assert s["rows"]["users"] == s["customers"] == 4_989
    assert s["rows"]["creators"] == s["terminals"] == 10_000
    assert round(100 * s["fraud_rate"], 3) == 0.833
    assert s["date_range"] == ["2018-04-01T00:00:31+00:00", "2018-09-14T23:59:42+00:00"]
    for table in ("items", "interactions", "consent_events"):
        assert s["rows"][table] == 0
    assert {p.name for p in out.iterdir()} == {f"{t}.parquet" for t in TABLES}
    users = read_table(out, "users")
    creators = read_table(out, "creators")
    assert (users["signup_time"] == pd.Timestamp("2018-04-01", tz="UTC")).all()
    assert (users["kyc_status"] == "none").all() and not users["is_guest"].any()
    assert set(handbook_numeric_id(users["user_id"])) == set(handbook["source"]["CUSTOMER_ID"])
    assert set(handbook_numeric_id(creators["creator_id"])) == set(handbook["source"]["TERMINAL_ID"])


@pytest.mark.xdist_group(name="handbook")
def test_handbook_payments_keep_the_original_ids_and_values(handbook: dict[str, Any]) -> None:
    src: pd.DataFrame = handbook["source"]
    pay: pd.DataFrame = handbook["payments"]
    assert np.array_equal(pay["tx"].to_numpy(), src["TRANSACTION_ID"].to_numpy())
    customer = src["CUSTOMER_ID"].to_numpy()
    assert np.array_equal(handbook_numeric_id(pay["user_id"]).to_numpy(), customer)
    assert np.array_equal(handbook_numeric_id(pay["card_fingerprint"]).to_numpy(), customer)
    assert (
        pay["card_fingerprint"].str.startswith("hb-card-").all()
        and pay["user_id"].str.startswith("hb-c").all()
    )
    assert np.array_equal(handbook_numeric_id(pay["creator_id"]).to_numpy(), src["TERMINAL_ID"].to_numpy())
    assert np.allclose(pay["amount"].to_numpy(), src["TX_AMOUNT"].to_numpy())
    assert (pay["payment_time"] == src["TX_DATETIME"].dt.tz_localize("UTC")).all()
    assert (pay["currency"] == "EUR").all() and (pay["kind"] == "purchase").all()
    unknown = ["device_id", "ip", "ip_country", "billing_country", "card_bin_country", "item_ids"]
    table = pq.read_table(handbook["out"] / "payments.parquet", columns=unknown)
    for name in unknown[:-1]:
        assert table.column(name).null_count == len(pay), name
    assert pc.max(pc.list_value_length(table.column("item_ids"))).as_py() == 0


@pytest.mark.xdist_group(name="handbook")
def test_handbook_disputes_are_the_frauds_seven_days_later(handbook: dict[str, Any]) -> None:
    src: pd.DataFrame = handbook["source"]
    pay: pd.DataFrame = handbook["payments"]
    disputes = read_table(handbook["out"], "disputes")
    assert len(disputes) == handbook["summary"]["frauds"] == int(src["TX_FRAUD"].sum())
    assert (disputes["reason"] == "fraud").all()
    tx = handbook_numeric_id(disputes["payment_id"]).to_numpy()
    assert np.array_equal(tx, handbook_numeric_id(disputes["dispute_id"]).to_numpy())
    row = np.searchsorted(pay["tx"].to_numpy(), tx)
    assert np.array_equal(pay["tx"].to_numpy()[row], tx)  # every dispute has its payment
    delay = disputes["reported_time"].to_numpy() - pay["payment_time"].to_numpy()[row]
    assert (delay == np.timedelta64(7, "D")).all()
    disputed = np.zeros(len(pay), dtype=bool)
    disputed[row] = True
    assert np.array_equal(disputed, src["TX_FRAUD"].to_numpy() == 1)
    assert (pay.loc[disputed, "fraud_pattern"] != "none").all()
    assert (pay.loc[~disputed, "fraud_pattern"] == "none").all()
    expected = src["TX_FRAUD_SCENARIO"].map(HB_SCENARIOS)
    assert (pay["fraud_pattern"] == expected).all()
    assert handbook["summary"]["fraud_patterns"] == expected.value_counts().to_dict()


# --------------------------------------------------------------------------- online-retail, real file, CLI


@pytest.fixture(scope="module")
def retail(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One import of the real file, through `aipic data import online-retail`."""
    source = shared_file("online-retail", "transactions.parquet")

    def run(out: Path) -> dict[str, Any]:
        args = ["data", "import", "online-retail", "--source", str(source), "--out", str(out)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        summary: dict[str, Any] = json.loads(result.stdout)
        return summary

    summary, out = _import_once(tmp_path_factory, "retail", run)
    return {"summary": summary, "out": out, "source": pq.read_table(source).to_pandas()}


@pytest.mark.xdist_group(name="retail")
def test_retail_every_line_is_accounted_for(retail: dict[str, Any]) -> None:
    s, out, src = retail["summary"], retail["out"], retail["source"]
    lines = s["lines"]
    assert lines["total"] == len(src) == 431_673
    assert (
        lines["purchase_interactions"] + lines["in_cancellations"] + lines["non_positive_in_purchases"]
        == 431_673
    )
    interactions = read_table(out, "interactions")
    pay = read_table(out, "payments")
    assert len(interactions) == lines["purchase_interactions"]
    assert len(pay) == src["InvoiceNo"].nunique() == s["invoices"]
    # lines of cancellations, counted from the source through the payments' kind
    kind = src["InvoiceNo"].map(pay.set_index("payment_id")["kind"])
    assert kind.notna().all()
    assert int((kind == "cancellation").sum()) == lines["in_cancellations"]
    bought = src[(kind == "purchase") & (src["Quantity"] > 0)]
    assert len(bought) == len(interactions)
    assert interactions["quantity"].sum() == bought["Quantity"].sum()
    assert (interactions["quantity"] >= 1).all() and (interactions["event_type"] == "purchase").all()
    assert set(interactions["session_id"]) <= set(pay.loc[pay["kind"] == "purchase", "payment_id"])


@pytest.mark.xdist_group(name="retail")
def test_retail_cancellations_are_marked_with_absolute_amounts(retail: dict[str, Any]) -> None:
    pay = read_table(retail["out"], "payments").set_index("payment_id")
    src = retail["source"]
    c_invoices = pay.index[pay.index.str.startswith("C")]
    assert len(c_invoices) == 3_249
    assert (pay.loc[c_invoices, "kind"] == "cancellation").all()
    net = (src["Quantity"] * src["UnitPrice"]).groupby(src["InvoiceNo"]).sum()
    assert np.allclose(pay["amount"], net.reindex(pay.index).abs().round(2))
    assert (pay["amount"] >= 0).all() and (pay["currency"] == "GBP").all()
    assert (pay.loc[pay["kind"] == "purchase", "amount"] >= 0).all()
    assert (net.reindex(pay.index)[pay["kind"] == "purchase"] >= 0).all()
    lines = src.groupby("InvoiceNo")["StockCode"].agg(lambda s: set(s))
    assert all(set(ids) == lines[inv] for inv, ids in pay["item_ids"].head(500).items())


@pytest.mark.xdist_group(name="retail")
def test_retail_guests_customers_and_countries(retail: dict[str, Any]) -> None:
    out, src, s = retail["out"], retail["source"], retail["summary"]
    users = read_table(out, "users")
    pay = read_table(out, "payments")
    guest_invoices = src.loc[src["CustomerID"].isna(), "InvoiceNo"].nunique()
    assert int(users["is_guest"].sum()) == guest_invoices == s["guests"]
    assert int((~users["is_guest"]).sum()) == src["CustomerID"].nunique() == s["customers"]
    assert users["user_id"].str.startswith("r-guest-").eq(users["is_guest"]).all()
    per_guest = pay[pay["user_id"].str.startswith("r-guest-")].groupby("user_id").size()
    assert (per_guest == 1).all() and len(per_guest) == guest_invoices
    assert set(pay["user_id"]) <= set(users["user_id"])
    for frame, col in ((users, "country"), (pay, "billing_country")):
        assert set(frame[col].dropna()) <= ISO_CODES
    invoice_country = src.groupby("InvoiceNo")["Country"].first()
    expected = invoice_country.reindex(pay["payment_id"]).map(RETAIL_COUNTRIES)
    assert (expected.isna().to_numpy() == pay["billing_country"].isna().to_numpy()).all()
    assert (expected.dropna().to_numpy() == pay["billing_country"].dropna().to_numpy()).all()
    assert set(s["countries_without_iso_code"]) == {"Unspecified", "European Community", "Channel Islands"}


@pytest.mark.xdist_group(name="retail")
def test_retail_items(retail: dict[str, Any]) -> None:
    out, src = retail["out"], retail["source"]
    items = read_table(out, "items").set_index("item_id")
    assert len(items) == src["StockCode"].nunique()
    assert items.loc["POST", "style"] == "postage" and items.loc["M", "style"] == "manual"
    digit_first = items.index.str.match(r"^\d")
    assert (items.loc[digit_first, "style"] == "product").all()
    assert (items["price"] >= 0).all() and (items["creator_id"] == "retail-uk").all()
    tags: Any = items.loc["85123A", "tags"]
    assert {"white", "hanging", "heart", "holder"} <= set(tags)
    interactions = read_table(out, "interactions", columns=["item_id"])
    assert set(interactions["item_id"]) <= set(items.index)


# --------------------------------------------------------------------------- small hand-made files


def _handbook_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "TRANSACTION_ID": [0, 1, 2, 3],
            "TX_DATETIME": pd.to_datetime(
                ["2018-04-01 00:00:31", "2018-04-01 08:00:00", "2018-04-02 10:00:00", "2018-04-03 11:30:00"]
            ),
            "CUSTOMER_ID": [7, 7, 8, 9],
            "TERMINAL_ID": [100, 101, 100, 102],
            "TX_AMOUNT": [10.0, 250.5, 30.0, 12.25],
            "TX_TIME_SECONDS": [31, 28800, 122400, 214200],
            "TX_TIME_DAYS": [0, 0, 1, 2],
            "TX_FRAUD": [0, 1, 1, 0],
            "TX_FRAUD_SCENARIO": [0, 1, 2, 0],
        }
    )


def _retail_frame() -> pd.DataFrame:
    rows = [
        ("536365", "85123A", "WHITE HANGING HEART", 6, "2010-12-01 08:26", 2.55, 17850, "United Kingdom"),
        ("536365", "POST", "POSTAGE", 1, "2010-12-01 08:26", 18.0, 17850, "United Kingdom"),
        ("C536379", "85123A", "WHITE HANGING HEART", -2, "2010-12-01 09:41", 2.55, 17850, "United Kingdom"),
        ("536400", "22633", "HAND WARMER", 3, "2010-12-01 10:00", 1.85, None, "Unspecified"),
        ("536401", "22633", None, -10, "2010-12-01 10:05", 0.0, None, "United Kingdom"),
        ("536402", "22633", "HAND WARMER", 2, "2010-12-02 11:00", 1.85, 12347, "Iceland"),
    ]
    df = pd.DataFrame(
        rows,
        columns=[
            "InvoiceNo",
            "StockCode",
            "Description",
            "Quantity",
            "InvoiceDate",
            "UnitPrice",
            "CustomerID",
            "Country",
        ],
    )
    df["InvoiceDate"] = pd.to_datetime(df["InvoiceDate"])
    df["CustomerID"] = df["CustomerID"].astype("Int64")
    return df


def _write(df: pd.DataFrame, path: Path) -> Path:
    df.to_parquet(path, index=False)
    return path


def test_small_handbook_mapping(tmp_path: Path) -> None:
    src = _write(_handbook_frame(), tmp_path / "transactions.parquet")
    out = tmp_path / "out"
    summary = import_fraud_handbook(tmp_path, out)  # a directory holding transactions.parquet works too
    assert summary["rows"]["payments"] == 4 and summary["customers"] == 3 and summary["terminals"] == 3
    assert summary["fraud_patterns"] == {"none": 2, "handbook_amount": 1, "handbook_terminal": 1}
    pay = read_table(out, "payments").set_index("payment_id")
    assert list(pay.index) == ["hb-tx0", "hb-tx1", "hb-tx2", "hb-tx3"]
    assert pay.loc["hb-tx1", "user_id"] == "hb-c7" and pay.loc["hb-tx1", "creator_id"] == "hb-t101"
    assert pay.loc["hb-tx1", "fraud_pattern"] == "handbook_amount"
    assert pay["currency"].eq("EUR").all() and pay["kind"].eq("purchase").all()
    assert pay[["device_id", "ip", "ip_country", "card_bin_country"]].isna().all().all()
    disputes = read_table(out, "disputes").set_index("payment_id")
    assert list(disputes.index) == ["hb-tx1", "hb-tx2"]
    assert disputes.loc["hb-tx2", "reported_time"] == pd.Timestamp("2018-04-09 10:00:00", tz="UTC")
    assert src.exists()


def test_small_retail_mapping(tmp_path: Path) -> None:
    src = _write(_retail_frame(), tmp_path / "retail.parquet")
    out = tmp_path / "out"
    summary = import_online_retail(src, out)
    assert summary["lines"] == {
        "total": 6,
        "purchase_interactions": 4,
        "in_cancellations": 2,
        "non_positive_in_purchases": 0,
    }
    assert summary["cancellations_by_rule"] == {
        "invoice_no_C": 1,
        "no_positive_quantity": 1,
        "negative_net_value": 0,
    }
    pay = read_table(out, "payments").set_index("payment_id")
    assert pay.loc["C536379", "kind"] == "cancellation" and pay.loc["C536379", "amount"] == pytest.approx(5.1)
    assert pay.loc["536401", "kind"] == "cancellation" and pay.loc["536401", "amount"] == 0.0
    assert pay.loc["536365", "amount"] == pytest.approx(6 * 2.55 + 18.0)
    item_ids: Any = pay.loc["536365", "item_ids"]
    assert list(item_ids) == ["85123A", "POST"]
    assert pay.loc["536400", "billing_country"] is None and pay.loc["536402", "billing_country"] == "IS"
    users = read_table(out, "users").set_index("user_id")
    assert set(users.index) == {"r17850", "r12347", "r-guest-536400", "r-guest-536401"}
    assert users.loc["r-guest-536400", "is_guest"] and not users.loc["r17850", "is_guest"]
    assert users.loc["r17850", "signup_time"] == pd.Timestamp("2010-12-01 08:26", tz="UTC")
    items = read_table(out, "items").set_index("item_id")
    assert items.loc["POST", "style"] == "postage" and items.loc["22633", "price"] == pytest.approx(1.85)
    inter = read_table(out, "interactions")
    assert sorted(inter["event_id"]) == ["536365-1", "536365-2", "536400-1", "536402-1"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("importer", [import_fraud_handbook, import_online_retail])
def test_missing_file_and_empty_directory(importer: Any, tmp_path: Path) -> None:
    with pytest.raises(DataImportError, match="not found") as exc:
        importer(tmp_path / "nope.parquet", tmp_path / "out")
    assert "nope.parquet" in str(exc.value)
    with pytest.raises(DataImportError, match=r"directory without transactions\.parquet"):
        importer(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("importer", [import_fraud_handbook, import_online_retail])
def test_not_parquet(importer: Any, tmp_path: Path) -> None:
    bad = tmp_path / "transactions.parquet"
    bad.write_text("TRANSACTION_ID,TX_DATETIME\n1,2018-04-01\n")
    with pytest.raises(DataImportError, match="not a readable parquet file") as exc:
        importer(bad, tmp_path / "out")
    assert str(bad) in str(exc.value)


def test_renamed_and_mistyped_columns(tmp_path: Path) -> None:
    renamed = _write(_handbook_frame().rename(columns={"TX_AMOUNT": "AMOUNT"}), tmp_path / "a.parquet")
    with pytest.raises(DataImportError, match=r"missing columns \['TX_AMOUNT'\]"):
        import_fraud_handbook(renamed, tmp_path / "out")
    typed = _handbook_frame()
    typed["TX_DATETIME"] = typed["TX_DATETIME"].astype(str)
    with pytest.raises(DataImportError, match="TX_DATETIME is string, expected timestamp"):
        import_fraud_handbook(_write(typed, tmp_path / "b.parquet"), tmp_path / "out")
    retail = _retail_frame()
    retail["Quantity"] = retail["Quantity"].astype(str)
    with pytest.raises(DataImportError, match="Quantity is string, expected integer"):
        import_online_retail(_write(retail, tmp_path / "c.parquet"), tmp_path / "out")
    with pytest.raises(DataImportError, match="missing columns"):
        import_online_retail(_write(_handbook_frame(), tmp_path / "d.parquet"), tmp_path / "out")


def test_bad_values_are_refused(tmp_path: Path) -> None:
    mismatch = _handbook_frame()
    mismatch.loc[0, "TX_FRAUD_SCENARIO"] = 3
    with pytest.raises(DataImportError, match="disagrees with TX_FRAUD_SCENARIO"):
        import_fraud_handbook(_write(mismatch, tmp_path / "a.parquet"), tmp_path / "out")
    negative = _handbook_frame()
    negative.loc[1, "TX_AMOUNT"] = -1.0
    with pytest.raises(DataImportError, match="TX_AMOUNT must be finite and non-negative"):
        import_fraud_handbook(_write(negative, tmp_path / "b.parquet"), tmp_path / "out")
    nulls = _retail_frame()
    nulls.loc[2, "InvoiceNo"] = None
    with pytest.raises(DataImportError, match="null values in required columns"):
        import_online_retail(_write(nulls, tmp_path / "c.parquet"), tmp_path / "out")


def test_failed_import_leaves_existing_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    import_fraud_handbook(_write(_handbook_frame(), tmp_path / "good.parquet"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = _handbook_frame()
    bad["TX_AMOUNT"] = [1.0, 2.0, float("nan"), 4.0]
    with pytest.raises(DataImportError):
        import_fraud_handbook(_write(bad, tmp_path / "bad.parquet"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging dir left either


def test_cli_error_exits_2_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.parquet"
    result = CliRunner().invoke(
        app, ["data", "import", "fraud-handbook", "--source", str(missing), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "error:" in result.output and "missing.parquet" in result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, DataImportError)


def test_cli_small_handbook(tmp_path: Path) -> None:
    src = _write(_handbook_frame(), tmp_path / "h.parquet")
    result = CliRunner().invoke(
        app, ["data", "import", "fraud-handbook", "--source", str(src), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"]["disputes"] == 2
    table = pq.read_table(tmp_path / "o" / "payments.parquet")
    assert table.schema.field("payment_time").type == pa.timestamp("us", tz="UTC")


def test_output_path_that_is_a_file(tmp_path: Path) -> None:
    src = _write(_handbook_frame(), tmp_path / "h.parquet")
    blocker = tmp_path / "out"
    blocker.write_text("not a directory")
    with pytest.raises(DataImportError, match="cannot write the output directory"):
        import_fraud_handbook(src, blocker)
    assert blocker.read_text() == "not a directory"
