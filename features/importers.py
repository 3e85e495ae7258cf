"""Map the two public benchmark data sets into the marketplace event model.

Both importers read one parquet file, check its columns and values, build every event table
with vectorised pandas/pyarrow code, validate all of them, and only then move them into the
output directory: a bad source never leaves a half-written directory behind. Tables a data set
has no rows for are written empty, so the output is always one consistent set of tables
(nothing left over from an earlier import into the same directory).

fraud-handbook (Le Borgne et al., simulated card payments):
- CUSTOMER_ID -> user ``hb-c<ID>`` and that user's one card ``hb-card-<ID>``;
  TERMINAL_ID -> creator (merchant) ``hb-t<ID>``; TRANSACTION_ID -> payment ``hb-tx<ID>``.
  The original numeric ids stay recoverable with :func:`handbook_numeric_id`.
- Every customer and terminal exists before the window in the simulator, so ``signup_time``
  and ``joined_time`` are midnight (UTC) of the data set's first day, not the first payment.
- TX_FRAUD_SCENARIO -> ``fraud_pattern`` (ground truth, evaluation only); each TX_FRAUD = 1
  -> a dispute ``hb-d<ID>`` (reason fraud) reported exactly 7 days after the payment, the
  handbook's label delay.
- No items, interactions or consent events exist: those tables are written empty.

online-retail (UCI Online Retail, a UK gift retailer):
- Each invoice -> one payment (``payment_id`` = InvoiceNo, GBP, seller ``retail-uk``),
  ``amount`` = absolute net value of its lines, ``item_ids`` = its distinct StockCodes.
  Kind ``cancellation`` for credit-side documents: InvoiceNo starting with "C" (cancellations
  kept as such), invoices with no line of positive quantity (the stock write-offs: damaged,
  thrown away; all guests at price 0) and invoices of negative net value (two of the three
  "A" bad-debt adjustments; the third, positive one stays a guest ``purchase`` of item "B",
  style "adjustment"). Everything else is a ``purchase``.
- Each line of a purchase with Quantity > 0 -> one ``purchase`` interaction
  (``event_id`` = ``<InvoiceNo>-<line number>``, ``session_id`` = InvoiceNo, quantity as
  given). Lines of cancellations exist only in their payment; no other line exists.
- StockCode -> item (exact code, lower-case variants kept distinct); ``style`` = "product"
  unless the code is a known service code (postage, fee, discount, manual, sample, voucher,
  adjustment); ``tags`` = words of its most frequent Description; ``price`` = median
  positive UnitPrice (0 when never sold at a positive price); ``created_time`` = first line.
- CustomerID -> user ``r<ID>`` (signup = first invoice, country = most frequent country);
  a null CustomerID is a guest: one user ``r-guest-<InvoiceNo>`` per invoice, ``is_guest``.
- Country names -> ISO-2 codes by an explicit table; names with no single code
  ("Unspecified", "European Community", "Channel Islands") -> null, and are counted.
- InvoiceDate is naive local UK time; it is taken as UTC (at most one hour off in summer).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.events import TABLES, FraudPattern, PaymentKind, arrow_schema
from features.storage import SchemaError, write_table

HANDBOOK_LABEL_DELAY = dt.timedelta(days=7)
HANDBOOK_PATTERNS: dict[int, FraudPattern] = {
    0: FraudPattern.NONE,
    1: FraudPattern.HANDBOOK_AMOUNT,
    2: FraudPattern.HANDBOOK_TERMINAL,
    3: FraudPattern.HANDBOOK_CARD,
}
RETAIL_SELLER = "retail-uk"
RETAIL_CURRENCY = "GBP"

# Country names of the Online Retail data set; None = no single ISO 3166-1 code.
RETAIL_COUNTRIES: dict[str, str | None] = {
    "Australia": "AU",
    "Austria": "AT",
    "Bahrain": "BH",
    "Belgium": "BE",
    "Brazil": "BR",
    "Canada": "CA",
    "Channel Islands": None,  # Jersey (JE) and Guernsey (GG) are separate codes
    "Cyprus": "CY",
    "Czech Republic": "CZ",
    "Denmark": "DK",
    "EIRE": "IE",
    "European Community": None,
    "Finland": "FI",
    "France": "FR",
    "Germany": "DE",
    "Greece": "GR",
    "Hong Kong": "HK",
    "Iceland": "IS",
    "Israel": "IL",
    "Italy": "IT",
    "Japan": "JP",
    "Lebanon": "LB",
    "Lithuania": "LT",
    "Malta": "MT",
    "Netherlands": "NL",
    "Norway": "NO",
    "Poland": "PL",
    "Portugal": "PT",
    "RSA": "ZA",
    "Saudi Arabia": "SA",
    "Singapore": "SG",
    "Spain": "ES",
    "Sweden": "SE",
    "Switzerland": "CH",
    "USA": "US",
    "United Arab Emirates": "AE",
    "United Kingdom": "GB",
    "Unspecified": None,
}

# Non-product StockCodes (exact, upper-cased) -> item style; "gift_…" codes are vouchers.
RETAIL_SERVICE_CODES: dict[str, str] = {
    "POST": "postage",
    "DOT": "postage",
    "C2": "postage",
    "AMAZONFEE": "fee",
    "BANK CHARGES": "fee",
    "CRUK": "fee",
    "D": "discount",
    "M": "manual",
    "S": "sample",
    "B": "adjustment",
}
TAG_STOPWORDS = frozenset({"and", "the", "for", "with", "set", "of", "in", "on", "to", "a"})

TypeCheck = Callable[[pa.DataType], bool]


def _is_number(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


def _is_text(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def _is_integer(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t))


def _is_timestamp(t: pa.DataType) -> bool:
    return bool(pa.types.is_timestamp(t))


HANDBOOK_COLUMNS: dict[str, tuple[TypeCheck, str]] = {
    "TRANSACTION_ID": (_is_integer, "integer"),
    "TX_DATETIME": (_is_timestamp, "timestamp"),
    "CUSTOMER_ID": (_is_integer, "integer"),
    "TERMINAL_ID": (_is_integer, "integer"),
    "TX_AMOUNT": (_is_number, "number"),
    "TX_FRAUD": (_is_integer, "integer"),
    "TX_FRAUD_SCENARIO": (_is_integer, "integer"),
}
RETAIL_COLUMNS: dict[str, tuple[TypeCheck, str]] = {
    "InvoiceNo": (_is_text, "string"),
    "StockCode": (_is_text, "string"),
    "Description": (_is_text, "string"),
    "Quantity": (_is_integer, "integer"),
    "InvoiceDate": (_is_timestamp, "timestamp"),
    "UnitPrice": (_is_number, "number"),
    "CustomerID": (_is_number, "integer (nullable)"),
    "Country": (_is_text, "string"),
}


class DataImportError(ValueError):
    """The source cannot be imported; the message names the file and the problem."""


def handbook_numeric_id(ids: pd.Series) -> pd.Series:
    """Recover the handbook's numeric id from an imported id (``hb-c42`` -> 42, ``hb-card-7`` -> 7).

    Vectorised in Arrow (about 1 s for the 1.6M payment ids); a non-handbook id raises.
    """
    digits = pc.replace_substring_regex(pa.array(ids, type=pa.string()), r"^hb-[a-z]+-?", "")
    try:
        numbers = pc.cast(digits, pa.int64())
    except pa.ArrowInvalid as exc:
        raise ValueError(f"not a fraud-handbook id: {exc}") from None
    return pd.Series(numbers.to_numpy(zero_copy_only=False), index=ids.index, name=ids.name)


# --------------------------------------------------------------------------- fraud-handbook


def import_fraud_handbook(source: Path, out: Path, *, progress: bool = False) -> dict[str, Any]:
    """Import the fraud-handbook transactions into users, creators, payments and disputes."""
    started = time.perf_counter()
    steps = _Steps(progress, "fraud-handbook")
    with steps("read and check source"):
        df = _read_source(source, HANDBOOK_COLUMNS)
        _check_handbook(df, source)
    with steps("map to event tables"):
        tables, extra = _map_handbook(df)
    with steps("validate and write tables"):
        rows = _write_all(tables, out, source)
    times = _utc(df["TX_DATETIME"])
    return {
        "dataset": "fraud-handbook",
        "source": str(source),
        "out": str(out),
        "rows": rows,
        "date_range": [times.min().isoformat(), times.max().isoformat()],
        **extra,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _check_handbook(df: pd.DataFrame, source: Path) -> None:
    amount = df["TX_AMOUNT"].to_numpy(dtype="float64")
    if not np.isfinite(amount).all() or (amount < 0).any():
        raise DataImportError(f"{source}: TX_AMOUNT must be finite and non-negative")
    if not df["TX_FRAUD"].isin([0, 1]).all():
        raise DataImportError(f"{source}: TX_FRAUD must be 0 or 1")
    bad = sorted(set(df["TX_FRAUD_SCENARIO"].unique()) - set(HANDBOOK_PATTERNS))
    if bad:
        raise DataImportError(f"{source}: unknown TX_FRAUD_SCENARIO values {bad[:5]}; expected 0-3")
    mismatch = int(((df["TX_FRAUD"] == 1) != (df["TX_FRAUD_SCENARIO"] > 0)).sum())
    if mismatch:
        raise DataImportError(f"{source}: {mismatch} rows where TX_FRAUD disagrees with TX_FRAUD_SCENARIO")
    if df["TRANSACTION_ID"].duplicated().any():
        raise DataImportError(f"{source}: TRANSACTION_ID is not unique")


def _map_handbook(df: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], dict[str, object]]:
    if not df["TX_DATETIME"].is_monotonic_increasing:  # the published file already is
        df = df.sort_values("TX_DATETIME", kind="stable", ignore_index=True)
    n = len(df)
    none = _nulls(n)
    pay_time = _utc(df["TX_DATETIME"])
    start = pay_time.min().floor("D")
    customer = pa.array(df["CUSTOMER_ID"].to_numpy())
    terminal = pa.array(df["TERMINAL_ID"].to_numpy())
    tx = pa.array(df["TRANSACTION_ID"].to_numpy())
    scenario = df["TX_FRAUD_SCENARIO"].to_numpy()
    pattern_codes = np.array(
        [HANDBOOK_PATTERNS[k].value for k in range(len(HANDBOOK_PATTERNS))], dtype=object
    )

    payments = pd.DataFrame(
        {
            "payment_id": _ids("hb-tx", tx),
            "user_id": _ids("hb-c", customer),
            "item_ids": pd.Series([[]] * n, dtype=object),  # one shared empty list: cheap
            "payment_time": pay_time,
            "kind": _constant(PaymentKind.PURCHASE.value, n),
            "amount": df["TX_AMOUNT"].astype("float64"),
            "currency": _constant("EUR", n),
            "card_fingerprint": _ids("hb-card-", customer),
            "card_bin_country": none,
            "billing_country": none,
            "device_id": none,
            "ip": none,
            "ip_country": none,
            "creator_id": _ids("hb-t", terminal),
            "fraud_pattern": pattern_codes[scenario],
        }
    )
    fraud = (df["TX_FRAUD"] == 1).to_numpy()
    disputes = pd.DataFrame(
        {
            "dispute_id": _ids("hb-d", tx.filter(pa.array(fraud))),
            "payment_id": payments["payment_id"][fraud].reset_index(drop=True),
            "reason": _constant("fraud", int(fraud.sum())),
            "reported_time": (pay_time[fraud] + HANDBOOK_LABEL_DELAY).reset_index(drop=True),
        }
    )
    customers = np.sort(df["CUSTOMER_ID"].unique())
    terminals = np.sort(df["TERMINAL_ID"].unique())
    users = pd.DataFrame(
        {
            "user_id": _ids("hb-c", pa.array(customers)),
            "signup_time": pd.Series(start, index=range(len(customers))),
            "date_of_birth": _nulls(len(customers)),
            "country": _nulls(len(customers)),
            "kyc_status": _constant("none", len(customers)),
            "is_guest": False,
        }
    )
    creators = pd.DataFrame(
        {
            "creator_id": _ids("hb-t", pa.array(terminals)),
            "user_id": _nulls(len(terminals)),
            "joined_time": pd.Series(start, index=range(len(terminals))),
            "country": _nulls(len(terminals)),
        }
    )
    by_pattern = payments["fraud_pattern"].value_counts().sort_index()
    extra: dict[str, object] = {
        "customers": len(customers),
        "terminals": len(terminals),
        "frauds": int(fraud.sum()),
        "fraud_rate": round(float(fraud.mean()), 6),
        "fraud_patterns": {str(k): int(v) for k, v in by_pattern.items()},
        "label_delay_days": HANDBOOK_LABEL_DELAY.days,
        "signup_time": start.isoformat(),
    }
    tables = {"users": users, "creators": creators, "payments": payments, "disputes": disputes}
    return tables, extra


# --------------------------------------------------------------------------- online-retail


def import_online_retail(source: Path, out: Path, *, progress: bool = False) -> dict[str, Any]:
    """Import the Online Retail invoice lines into users, items, interactions and payments."""
    started = time.perf_counter()
    steps = _Steps(progress, "online-retail")
    with steps("read and check source"):
        df = _read_source(source, RETAIL_COLUMNS)
        _check_retail(df, source)
    with steps("map to event tables"):
        tables, extra = _map_retail(df)
    with steps("validate and write tables"):
        rows = _write_all(tables, out, source)
    times = _utc(df["InvoiceDate"])
    return {
        "dataset": "online-retail",
        "source": str(source),
        "out": str(out),
        "rows": rows,
        "date_range": [times.min().isoformat(), times.max().isoformat()],
        **extra,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _check_retail(df: pd.DataFrame, source: Path) -> None:
    price = df["UnitPrice"].to_numpy(dtype="float64")
    if not np.isfinite(price).all():
        raise DataImportError(f"{source}: UnitPrice has non-finite values")
    cust = df["CustomerID"].dropna()
    if len(cust) and not (cust.astype("float64") % 1 == 0).all():
        raise DataImportError(f"{source}: CustomerID has non-integer values")


def _map_retail(df: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], dict[str, object]]:
    lines = df.reset_index(drop=True)
    lines["time"] = _utc(lines["InvoiceDate"])
    lines["value"] = lines["Quantity"] * lines["UnitPrice"].astype("float64")
    lines["iso"] = lines["Country"].map(RETAIL_COUNTRIES).astype("object")
    cust = lines["CustomerID"].astype("Int64")
    guest = cust.isna().to_numpy()
    lines["guest"] = guest
    lines["user_id"] = np.where(guest, "r-guest-" + lines["InvoiceNo"], "r" + cust.astype("string"))

    inv = lines.groupby("InvoiceNo", sort=False).agg(
        time=("time", "min"),
        net=("value", "sum"),
        max_qty=("Quantity", "max"),
        user_id=("user_id", "first"),
        iso=("iso", "first"),
        guest=("guest", "all"),
    )
    inv["net"] = inv["net"].round(2)  # pence: float noise must not flip the sign of a zero total
    credit = inv.index.str.startswith("C") | (inv["max_qty"] <= 0) | (inv["net"] < 0)
    inv["kind"] = np.where(credit, PaymentKind.CANCELLATION.value, PaymentKind.PURCHASE.value)
    inv = inv.sort_values(["time"], kind="stable")
    distinct = lines.drop_duplicates(["InvoiceNo", "StockCode"])
    payments = pd.DataFrame(
        {
            "payment_id": inv.index.to_numpy(),
            "user_id": inv["user_id"].to_numpy(),
            "item_ids": _lists_by_key(distinct["InvoiceNo"], distinct["StockCode"], inv.index).to_pylist(),
            "payment_time": inv["time"].to_numpy(),
            "kind": inv["kind"].to_numpy(),
            "amount": inv["net"].abs().to_numpy(),
            "currency": RETAIL_CURRENCY,
            "card_fingerprint": None,
            "card_bin_country": None,
            "billing_country": inv["iso"].to_numpy(),
            "device_id": None,
            "ip": None,
            "ip_country": None,
            "creator_id": RETAIL_SELLER,
            "fraud_pattern": None,
        }
    )
    payments["payment_time"] = _utc(payments["payment_time"])

    kind_of_line = lines["InvoiceNo"].map(inv["kind"])
    bought = ((kind_of_line == PaymentKind.PURCHASE.value) & (lines["Quantity"] > 0)).to_numpy()
    line_no = lines.groupby("InvoiceNo", sort=False).cumcount() + 1
    pl = lines[bought]
    interactions = pd.DataFrame(
        {
            "event_id": pl["InvoiceNo"] + "-" + line_no[bought].astype(str),
            "user_id": pl["user_id"],
            "item_id": pl["StockCode"],
            "event_type": "purchase",
            "event_time": pl["time"],
            "session_id": pl["InvoiceNo"],
            "device_id": None,
            "ip": None,
            "ip_country": None,
            "quantity": pl["Quantity"].astype("int64"),
        }
    ).sort_values("event_time", kind="stable", ignore_index=True)

    items = _retail_items(lines)
    users = _retail_users(lines, inv)
    first = payments["payment_time"].min()
    creators = pd.DataFrame({"creator_id": [RETAIL_SELLER], "user_id": [None], "joined_time": [first]})
    creators["country"] = "GB"

    credit_lines = int((kind_of_line == PaymentKind.CANCELLATION.value).sum())
    unmapped = lines.loc[lines["iso"].isna(), "Country"].value_counts()
    extra: dict[str, object] = {
        "invoices": len(inv),
        "purchases": int((inv["kind"] == PaymentKind.PURCHASE.value).sum()),
        "cancellations": int(credit.sum()),
        "cancellations_by_rule": {
            "invoice_no_C": int(inv.index.str.startswith("C").sum()),
            "no_positive_quantity": int(((inv["max_qty"] <= 0) & ~inv.index.str.startswith("C")).sum()),
            "negative_net_value": int(
                ((inv["net"] < 0) & (inv["max_qty"] > 0) & ~inv.index.str.startswith("C")).sum()
            ),
        },
        "customers": int((~users["is_guest"]).sum()),
        "guests": int(users["is_guest"].sum()),
        "items_by_style": {str(k): int(v) for k, v in items["style"].value_counts().sort_index().items()},
        "lines": {
            "total": len(lines),
            "purchase_interactions": int(bought.sum()),
            "in_cancellations": credit_lines,
            "non_positive_in_purchases": len(lines) - int(bought.sum()) - credit_lines,
        },
        "countries_without_iso_code": {str(k): int(v) for k, v in unmapped.items()},
        "time_zone_assumed": "UTC",
    }
    tables = {
        "users": users,
        "creators": creators,
        "items": items,
        "interactions": interactions,
        "payments": payments,
    }
    return tables, extra


def _retail_items(lines: pd.DataFrame) -> pd.DataFrame:
    """One item per StockCode: style from the code, tags from its most frequent description."""
    g = lines.groupby("StockCode", sort=True)
    positive = lines[lines["UnitPrice"] > 0].groupby("StockCode")["UnitPrice"].median()
    desc = (
        lines.dropna(subset=["Description"])
        .groupby(["StockCode", "Description"])
        .size()
        .rename("n")
        .reset_index()
        .sort_values(["StockCode", "n", "Description"], ascending=[True, False, True])
        .drop_duplicates("StockCode")
        .set_index("StockCode")["Description"]
    )
    codes = g.size().index.to_series()
    upper = codes.str.upper()
    style = upper.map(RETAIL_SERVICE_CODES)
    style = style.mask(style.isna() & upper.str.startswith("GIFT_"), "voucher").fillna("product")
    words = desc.reindex(codes.index).fillna("").str.lower().str.findall(r"[a-z]{3,}")
    tags = [sorted(set(w) - TAG_STOPWORDS) for w in words]  # ~4k items: small
    return pd.DataFrame(
        {
            "item_id": codes.to_numpy(),
            "creator_id": RETAIL_SELLER,
            "style": style.to_numpy(),
            "tags": tags,
            "price": positive.reindex(codes.index).fillna(0.0).round(2).to_numpy(),
            "currency": RETAIL_CURRENCY,
            "created_time": g["time"].min().to_numpy(),
            "status": "active",
        }
    ).assign(created_time=lambda d: _utc(d["created_time"]))


def _retail_users(lines: pd.DataFrame, inv: pd.DataFrame) -> pd.DataFrame:
    """Registered customers (first invoice, most frequent country) and one guest per invoice."""
    known = lines[lines["CustomerID"].notna()]
    signup = known.groupby("user_id")["time"].min()
    country = (
        known.groupby(["user_id", "Country"])
        .size()
        .rename("n")
        .reset_index()
        .sort_values(["user_id", "n", "Country"], ascending=[True, False, True])
        .drop_duplicates("user_id")
        .set_index("user_id")["Country"]
        .map(RETAIL_COUNTRIES)
    )
    registered = pd.DataFrame(
        {
            "user_id": signup.index.to_numpy(),
            "signup_time": signup.to_numpy(),
            "country": country.reindex(signup.index).to_numpy(),
            "is_guest": False,
        }
    )
    guests_inv = inv[inv["guest"]]
    guests = pd.DataFrame(
        {
            "user_id": guests_inv["user_id"].to_numpy(),
            "signup_time": guests_inv["time"].to_numpy(),
            "country": guests_inv["iso"].to_numpy(),
            "is_guest": True,
        }
    )
    users = pd.concat([registered, guests], ignore_index=True)
    users["signup_time"] = _utc(users["signup_time"])
    users["date_of_birth"] = None
    users["kyc_status"] = "none"
    return users


# --------------------------------------------------------------------------- shared helpers


def _read_source(source: Path, columns: dict[str, tuple[TypeCheck, str]]) -> pd.DataFrame:
    """Read the needed columns of a parquet file, or raise DataImportError saying what is wrong."""
    source = Path(source)
    if source.is_dir():
        candidate = source / "transactions.parquet"
        if not candidate.is_file():
            raise DataImportError(f"{source} is a directory without transactions.parquet")
        source = candidate
    if not source.is_file():
        raise DataImportError(f"{source}: file not found")
    try:
        schema = pq.read_schema(source)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataImportError(f"{source}: not a readable parquet file ({exc})") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataImportError(f"{source}: missing columns {missing}; found {schema.names}")
    wrong = [
        f"{name} is {schema.field(name).type}, expected {label}"
        for name, (ok, label) in columns.items()
        if not ok(schema.field(name).type)
    ]
    if wrong:
        raise DataImportError(f"{source}: wrong column types: {'; '.join(wrong)}")
    try:
        table = pq.read_table(source, columns=list(columns))
    except (pa.ArrowException, OSError) as exc:
        raise DataImportError(f"{source}: cannot read ({exc})") from None
    if table.num_rows == 0:
        raise DataImportError(f"{source}: no rows")
    nullable = {"Description", "CustomerID", "Country"}
    nulls = {c: table.column(c).null_count for c in columns if c not in nullable}
    nulls = {c: k for c, k in nulls.items() if k}
    if nulls:
        raise DataImportError(f"{source}: null values in required columns {nulls}")
    return table.to_pandas()


def _write_all(tables: dict[str, pd.DataFrame], out: Path, source: Path) -> dict[str, int]:
    """Write every table (empty for those not given) to a staging dir, then move them all into out.

    Validation happens in the staging directory, so a SchemaError leaves ``out`` untouched.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=out))
    except OSError as exc:
        raise DataImportError(f"{out}: cannot write the output directory ({exc})") from None
    rows: dict[str, int] = {}
    try:
        for name, model in TABLES.items():
            df = tables.get(name)
            if df is None:
                df = pd.DataFrame({c: pd.Series([], dtype="object") for c in arrow_schema(model).names})
            try:
                write_table(df, staging, name)
            except SchemaError as exc:
                raise DataImportError(f"{source}: mapped data does not fit the event model: {exc}") from None
            rows[name] = len(df)
        for name in TABLES:
            os.replace(staging / f"{name}.parquet", out / f"{name}.parquet")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return rows


def _utc(s: pd.Series) -> pd.Series:
    """Naive timestamps are taken as UTC; aware ones are converted to UTC."""
    s = pd.to_datetime(s)
    if s.dt.tz is None:
        return s.dt.tz_localize("UTC")
    return s.dt.tz_convert("UTC")


def _ids(prefix: str, numbers: pa.Array) -> pd.Series:
    """``prefix`` + decimal number, built in Arrow (no Python loop over 1.6M rows).

    Returned as a plain object column: ArrowDtype columns would leave pandas metadata in the
    parquet file that makes ``read_table`` return different dtypes than for other sources.
    """
    text = pc.binary_join_element_wise(prefix, pc.cast(numbers, pa.string()), "")
    return pd.Series(text.to_pandas(deduplicate_objects=False), dtype=object)


def _constant(value: str, n: int) -> np.ndarray:
    return np.full(n, value, dtype=object)


def _lists_by_key(keys: pd.Series, values: pd.Series, order: pd.Index) -> pa.Array:
    """One ``list<string>`` per key of ``order``: its values in their original order (vectorised)."""
    pos = order.get_indexer(pd.Index(keys))
    if (pos < 0).any():
        raise ValueError("keys missing from order")
    sort = np.argsort(pos, kind="stable")
    counts = np.bincount(pos, minlength=len(order))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = pa.array(values.to_numpy()[sort], type=pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


def _nulls(n: int) -> np.ndarray:
    return np.full(n, None, dtype=object)


class _Steps:
    """Timed steps, shown on stderr with rich when ``progress`` (stdout stays clean JSON)."""

    def __init__(self, progress: bool, name: str) -> None:
        self.name = name
        self.console = None
        if progress:
            from rich.console import Console

            self.console = Console(stderr=True)

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.console is None:
            yield
            return
        with self.console.status(f"{self.name}: {step}…"):
            yield
        self.console.log(f"{self.name}: {step} ({time.perf_counter() - t0:.1f} s)")
