"""Fraud features of a payment, point-in-time correct, computed for every payment at once.

Semantics (shared with the online path in `features.online`, checked by the parity test):

* **As-of rule.** The vector of payment *p* at time *t* sees every event strictly before *t*
  plus *p* itself. Other payments at exactly the same microsecond are *not* seen (neither
  sees the other), so the result does not depend on arrival order of simultaneous events.
* **Window edges.** A window of length *W* is the half-open interval ``(t - W, t]``: an event
  exactly *W* before is outside, one microsecond later is inside. Timestamps are integer
  microseconds, so the edges are exact.
* **Current payment included** in velocity counts/sums/means/maxima and distinct counts (as
  the fraud handbook does for card windows). History-relative features (ratio to mean,
  z-score, time since previous payment) compare with the *previous* payments only.
* **Labels never leak.** A dispute counts from its ``reported_time`` (strictly before *t*),
  never from the time of the disputed payment.
* **Money** is summed in integer cents (``floor(amount * 100 + 0.5)``) so sums, means and
  maxima are bit-identical offline and online.
* Only ``kind == purchase`` payments are scored or counted; cancellations are ignored.

The offline computation is vectorised DuckDB SQL (window functions over ``RANGE`` frames on
integer microseconds); no Python loop touches rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from features.definitions import FeatureDef
from features.feature_repo import FeatureSet, write_offline_tables
from features.storage import table_path

US = 1_000_000
MINUTE = 60 * US
HOUR = 60 * MINUTE
DAY = 24 * HOUR

#: Velocity windows: name -> length in microseconds.
WINDOWS: dict[str, int] = {"10m": 10 * MINUTE, "1h": HOUR, "24h": DAY, "7d": 7 * DAY, "30d": 30 * DAY}
#: Window of distinct counts, history-relative statistics and the creator concentration.
HISTORY_WINDOW = "30d"
#: Windows of disputes reported against a creator.
CREATOR_DISPUTE_WINDOWS = ("7d", "30d")

VELOCITY_ENTITIES = ("user", "card", "device", "ip")
#: Event column of each entity's key.
JOIN_KEYS: dict[str, str] = {
    "user": "user_id",
    "card": "card_fingerprint",
    "device": "device_id",
    "ip": "ip",
    "creator": "creator_id",
    "payment": "payment_id",
}

PAY = "user.payment"
PURCHASES = "user.behavior.purchase_history"
CARD = "user.financial.credit_card"
DEVICE = "user.device.device_id"
IP = "user.device.ip_address"
LOCATION = "user.location.imprecise"
ADDRESS_COUNTRY = "user.contact.address.country"
ACCOUNT = "user.account"

_ENTITY_CATEGORIES: dict[str, tuple[str, ...]] = {
    "user": (PURCHASES, PAY),
    "card": (CARD, PAY),
    "device": (DEVICE, PAY),
    "ip": (IP, PAY),
}


class FeaturePipelineError(ValueError):
    """The event tables cannot produce payment features (missing table, bad values)."""


def _velocity_defs() -> list[FeatureDef]:
    out: list[FeatureDef] = []
    for ent in VELOCITY_ENTITIES:
        cats = _ENTITY_CATEGORIES[ent]
        for w in WINDOWS:
            span = f"in the {w} up to and including this payment, same {ent}"
            # Counts are monotone +1: without it the model read a card-testing burst as "a card
            # with history, so trusted" (tests/test_fraud_behaviour.py caught it).
            out += [
                FeatureDef(
                    f"{ent}_count_{w}",
                    ent,
                    f"Number of payments {span}.",
                    cats,
                    "derived",
                    monotone=1,
                ),
                FeatureDef(
                    f"{ent}_amount_sum_{w}",
                    ent,
                    f"Total amount of payments {span}.",
                    cats,
                    "derived",
                    monotone=1,
                ),
                FeatureDef(
                    f"{ent}_amount_mean_{w}",
                    ent,
                    f"Mean amount of payments {span}.",
                    cats,
                    "derived",
                    monotone=1,
                ),
                FeatureDef(
                    f"{ent}_amount_max_{w}",
                    ent,
                    f"Largest amount of payments {span}.",
                    cats,
                    "derived",
                    monotone=1,
                ),
            ]
    return out


def _other_defs() -> list[FeatureDef]:
    h = HISTORY_WINDOW
    d = FeatureDef
    return [
        # request: the payment itself
        d("amount", "request", "Amount of this payment.", (PAY,), "observed", monotone=1),
        d("is_night", "request", "1 if paid between 00:00 and 06:00 UTC.", (PAY,), "observed"),
        d("is_weekend", "request", "1 if paid on a Saturday or Sunday (UTC).", (PAY,), "observed"),
        d(
            "bin_billing_mismatch",
            "request",
            "1 if the card's issuing country differs from the billing country.",
            (CARD, ADDRESS_COUNTRY),
            "derived",
        ),
        d(
            "ip_bin_mismatch",
            "request",
            "1 if the IP's country differs from the card's issuing country.",
            (LOCATION, IP, CARD),
            "derived",
        ),
        d(
            "ip_billing_mismatch",
            "request",
            "1 if the IP's country differs from the billing country.",
            (LOCATION, IP, ADDRESS_COUNTRY),
            "derived",
        ),
        # user history and profile
        d(
            f"user_amount_ratio_mean_{h}",
            "user",
            f"Amount divided by the mean of the user's previous payments in {h} (null without history).",
            (PURCHASES, PAY),
            "derived",
            monotone=1,
        ),
        d(
            f"user_amount_zscore_{h}",
            "user",
            f"Z-score of the amount against the user's previous payments in {h} (null under 2 or no spread).",
            (PURCHASES, PAY),
            "derived",
            monotone=1,
        ),
        d(
            f"user_secs_since_prev_payment_{h}",
            "user",
            f"Seconds since the user's previous payment, null if none in {h}.",
            (PURCHASES, PAY),
            "derived",
        ),
        d("user_account_age_days", "user", "Days since the user signed up.", (ACCOUNT,), "derived"),
        d("user_kyc_verified", "user", "1 if the user's identity is verified.", (ACCOUNT,), "provided"),
        d("user_kyc_pending", "user", "1 if the user's verification is pending.", (ACCOUNT,), "provided"),
        d("user_kyc_failed", "user", "1 if the user's verification failed.", (ACCOUNT,), "provided"),
        d("user_is_guest", "user", "1 for a guest checkout without an account.", (ACCOUNT,), "provided"),
        d(
            f"user_distinct_cards_{h}",
            "user",
            f"Distinct cards the user paid with in {h} (this payment included).",
            (CARD, PAY),
            "derived",
        ),
        d(
            f"user_distinct_devices_{h}",
            "user",
            f"Distinct devices the user paid from in {h} (this payment included).",
            (DEVICE,),
            "derived",
        ),
        d(
            f"user_distinct_ips_{h}",
            "user",
            f"Distinct IP addresses the user paid from in {h} (this payment included).",
            (IP,),
            "derived",
        ),
        d(
            f"user_distinct_countries_{h}",
            "user",
            f"Distinct IP countries the user paid from in {h} (this payment included).",
            (LOCATION, IP),
            "derived",
        ),
        d(
            "user_new_card",
            "user",
            "1 if the user never paid with this card before (null without a card).",
            (CARD, PAY),
            "derived",
        ),
        d(
            "user_new_device",
            "user",
            "1 if the user never paid from this device before (null without a device).",
            (DEVICE,),
            "derived",
        ),
        d(
            "user_new_country",
            "user",
            "1 if the user never paid from this IP country before (null without one).",
            (LOCATION, IP),
            "derived",
        ),
        d(
            "user_country_ip_mismatch",
            "user",
            "1 if the IP's country differs from the user's declared country.",
            (LOCATION, IP, ADDRESS_COUNTRY),
            "derived",
        ),
        d(
            "user_disputes_reported",
            "user",
            "Disputes already reported against the user's earlier payments.",
            (PURCHASES, PAY),
            "derived",
        ),
        # shared instruments: how many people use them
        d(
            f"card_distinct_users_{h}",
            "card",
            f"Distinct users who paid with this card in {h} (this payment included).",
            (CARD, PAY),
            "derived",
            monotone=1,
        ),
        d(
            "card_disputes_reported",
            "card",
            "Disputes already reported against earlier payments with this card.",
            (CARD, PAY),
            "derived",
        ),
        d(
            f"device_distinct_users_{h}",
            "device",
            f"Distinct users who paid from this device in {h} (this payment included).",
            (DEVICE,),
            "derived",
            monotone=1,
        ),
        d(
            f"ip_distinct_users_{h}",
            "ip",
            f"Distinct users who paid from this IP address in {h} (this payment included).",
            (IP,),
            "derived",
            monotone=1,
        ),
        # creator (seller) risk
        d(
            "creator_prior_payments",
            "creator",
            "Payments the creator received before this one.",
            (PAY,),
            "derived",
        ),
        d(
            "creator_disputes_reported",
            "creator",
            "Disputes reported so far against the creator's sales.",
            (PAY,),
            "derived",
        ),
        *[
            d(
                f"creator_disputes_reported_{w}",
                "creator",
                f"Disputes reported in the last {w} against the creator's sales.",
                (PAY,),
                "derived",
            )
            for w in CREATOR_DISPUTE_WINDOWS
        ],
        d(
            "creator_dispute_rate",
            "creator",
            "Disputes reported so far / payments the creator received before (null if none).",
            (PAY,),
            "derived",
        ),
        d(
            f"creator_payments_{h}",
            "creator",
            f"Payments to the creator in {h} (this payment included).",
            (PAY,),
            "derived",
        ),
        d(
            f"creator_distinct_buyers_{h}",
            "creator",
            f"Distinct buyers of the creator in {h} (this payment included).",
            (PURCHASES,),
            "derived",
        ),
        d(
            f"creator_repeat_share_{h}",
            "creator",
            f"Share of the creator's payments in {h} that came from a buyer with an earlier one in the "
            "window (1 - distinct buyers / payments): sales concentrated on few buyers.",
            (PURCHASES,),
            "derived",
        ),
        d(
            f"creator_buyer_share_{h}",
            "creator",
            f"Share of the creator's payments in {h} made by this buyer.",
            (PURCHASES,),
            "derived",
        ),
        # items bought
        d("items_count", "payment", "Number of items in the payment.", (PURCHASES,), "observed"),
        d("items_price_sum", "payment", "Sum of the listed prices of the items.", (PURCHASES,), "derived"),
        d("items_price_max", "payment", "Highest listed price among the items.", (PURCHASES,), "derived"),
        d(
            "items_min_age_days",
            "payment",
            "Age in days of the newest item bought (fresh listings are riskier).",
            (PURCHASES,),
            "derived",
        ),
    ]


#: Every fraud model input, in model column order.
PAYMENT_FEATURES: list[FeatureDef] = _velocity_defs() + _other_defs()
PAYMENT_FEATURE_NAMES: list[str] = [f.name for f in PAYMENT_FEATURES]
#: Identifying columns that precede the features in `payment_feature_frame`.
KEY_COLUMNS = ["payment_id", "user_id", "card_fingerprint", "payment_time"]
EXTRA_KEY_COLUMNS = ["device_id", "ip", "creator_id"]


@dataclass(frozen=True)
class BuildStats:
    """How long the offline build took; for progress output and the benchmark."""

    payments: int
    seconds: float

    @property
    def payments_per_second(self) -> float:
        return self.payments / self.seconds if self.seconds > 0 else float("inf")


# --- SQL ------------------------------------------------------------------------------------


def _frame(width_us: int) -> str:
    """RANGE frame (t - W, t] that keeps the current row but drops its same-time peers."""
    return f"RANGE BETWEEN {width_us - 1} PRECEDING AND CURRENT ROW EXCLUDE TIES"


def _prior(width_us: int | None) -> str:
    """RANGE frame (t - W, t): strictly earlier events only (W None = all history)."""
    start = "UNBOUNDED" if width_us is None else str(width_us - 1)
    return f"RANGE BETWEEN {start} PRECEDING AND 1 PRECEDING"


def _distinct(part: str, col: str, width_us: int) -> str:
    """Distinct non-null ``col`` per ``part`` in (t - W, t], this payment included.

    DuckDB's DISTINCT window aggregate is slow with ``EXCLUDE TIES``, so: distinct values
    strictly before (t - W, t) plus one if this payment's value was not among them.
    """
    prior = f"count(DISTINCT {col}) OVER (PARTITION BY {part} ORDER BY ts {_prior(width_us)})"
    last = f"max(ts) OVER (PARTITION BY {part}, {col} ORDER BY ts {_prior(None)})"
    new = f"({col} IS NOT NULL AND coalesce({last} <= ts - {width_us}, true))::BIGINT"
    return f"({prior} + {new})"


def _velocity_sql(entity: str) -> str:
    key = JOIN_KEYS[entity]
    cols: list[str] = []
    windows: list[str] = []
    for w, width in WINDOWS.items():
        cols += [
            f"count(*) OVER w{w} AS n_{w}",
            f"sum(cents) OVER w{w} AS s_{w}",
            f"max(cents) OVER w{w} AS m_{w}",
        ]
        windows.append(f"w{w} AS (PARTITION BY {key} ORDER BY ts {_frame(width)})")
    select = []
    for w in WINDOWS:
        select += [
            f"n_{w}::DOUBLE AS {entity}_count_{w}",
            f"s_{w}::DOUBLE / 100.0 AS {entity}_amount_sum_{w}",
            f"s_{w}::DOUBLE / n_{w} / 100.0 AS {entity}_amount_mean_{w}",
            f"m_{w}::DOUBLE / 100.0 AS {entity}_amount_max_{w}",
        ]
    return f"""
        SELECT rid, {", ".join(select)}
        FROM (SELECT rid, {", ".join(cols)} FROM p WHERE {key} IS NOT NULL
              WINDOW {", ".join(windows)})
    """


def _user_sql(present: set[str]) -> str:
    h = HISTORY_WINDOW
    width = WINDOWS[h]

    def distinct(col: str) -> str:  # a column without any value has no distinct values
        return _distinct("user_id", col, width) if col in present else "0"

    def first(col: str) -> str:
        return f"min(ts) OVER (PARTITION BY user_id, {col})" if col in present else "NULL::BIGINT"

    return f"""
        SELECT q.rid,
          CASE WHEN q.n_prev > 0 AND q.s_prev > 0
               THEN (q.n_prev * q.cents)::DOUBLE / q.s_prev::DOUBLE END AS user_amount_ratio_mean_{h},
          CASE WHEN q.n_prev >= 2 AND q.n_prev * q.ss_prev - q.s_prev * q.s_prev > 0
               THEN (q.n_prev * q.cents - q.s_prev)::DOUBLE
                    / sqrt((q.n_prev * q.ss_prev - q.s_prev * q.s_prev)::DOUBLE) END AS user_amount_zscore_{h},
          (q.ts - q.last_prev)::DOUBLE / {US} AS user_secs_since_prev_payment_{h},
          CASE WHEN u.signup_ts IS NOT NULL THEN (q.ts - u.signup_ts)::DOUBLE / {DAY} END
            AS user_account_age_days,
          CASE WHEN u.kyc_status IS NOT NULL THEN (u.kyc_status = 'verified')::DOUBLE END AS user_kyc_verified,
          CASE WHEN u.kyc_status IS NOT NULL THEN (u.kyc_status = 'pending')::DOUBLE END AS user_kyc_pending,
          CASE WHEN u.kyc_status IS NOT NULL THEN (u.kyc_status = 'failed')::DOUBLE END AS user_kyc_failed,
          u.is_guest::DOUBLE AS user_is_guest,
          q.dc::DOUBLE AS user_distinct_cards_{h},
          q.dd::DOUBLE AS user_distinct_devices_{h},
          q.di::DOUBLE AS user_distinct_ips_{h},
          q.dk::DOUBLE AS user_distinct_countries_{h},
          CASE WHEN q.card_fingerprint IS NOT NULL THEN (q.first_card = q.ts)::DOUBLE END AS user_new_card,
          CASE WHEN q.device_id IS NOT NULL THEN (q.first_device = q.ts)::DOUBLE END AS user_new_device,
          CASE WHEN q.ip_country IS NOT NULL THEN (q.first_country = q.ts)::DOUBLE END AS user_new_country,
          CASE WHEN q.ip_country IS NOT NULL AND u.country IS NOT NULL
               THEN (q.ip_country <> u.country)::DOUBLE END AS user_country_ip_mismatch
        FROM (
          SELECT rid, user_id, ts, cents, card_fingerprint, device_id, ip_country,
            count(*) OVER prev AS n_prev,
            sum(cents) OVER prev AS s_prev,
            sum(cents::HUGEINT * cents) OVER prev AS ss_prev,
            max(ts) OVER prev AS last_prev,
            {distinct("card_fingerprint")} AS dc,
            {distinct("device_id")} AS dd,
            {distinct("ip")} AS di,
            {distinct("ip_country")} AS dk,
            {first("card_fingerprint")} AS first_card,
            {first("device_id")} AS first_device,
            {first("ip_country")} AS first_country
          FROM p
          WINDOW prev AS (PARTITION BY user_id ORDER BY ts {_prior(width)})
        ) q LEFT JOIN u ON q.user_id = u.user_id
    """


def _distinct_users_sql(entity: str) -> str:
    key = JOIN_KEYS[entity]
    h = HISTORY_WINDOW
    return f"""
        SELECT rid,
          {_distinct(key, "user_id", WINDOWS[h])}::DOUBLE AS {entity}_distinct_users_{h}
        FROM p WHERE {key} IS NOT NULL
    """


def _disputes_sql(entity: str, windows: tuple[str, ...] = ()) -> str:
    """Disputes reported strictly before each payment, against the entity's payments.

    Payments and disputes share one timeline per entity key; a running sum over the rows
    strictly earlier than each payment counts the disputes already reported by then.
    """
    key = JOIN_KEYS[entity]
    cols = [
        f"sum(is_d) OVER (PARTITION BY k ORDER BY ts {_prior(None)}) AS d_all",
        f"sum(1 - is_d) OVER (PARTITION BY k ORDER BY ts {_prior(None)}) AS n_all",
    ]
    cols += [f"sum(is_d) OVER (PARTITION BY k ORDER BY ts {_prior(WINDOWS[w])}) AS d_{w}" for w in windows]
    outs = [f"coalesce(d_all, 0)::DOUBLE AS {entity}_disputes_reported"]
    outs += [f"coalesce(d_{w}, 0)::DOUBLE AS {entity}_disputes_reported_{w}" for w in windows]
    if entity == "creator":
        outs += [
            "coalesce(n_all, 0)::DOUBLE AS creator_prior_payments",
            "CASE WHEN n_all > 0 THEN coalesce(d_all, 0)::DOUBLE / n_all END AS creator_dispute_rate",
        ]
    return f"""
        SELECT rid, {", ".join(outs)} FROM (
          SELECT rid, {", ".join(cols)} FROM (
            SELECT {key} AS k, ts, rid, 0 AS is_d FROM p WHERE {key} IS NOT NULL
            UNION ALL
            SELECT p.{key}, d.reported_ts, NULL, 1 FROM d JOIN p USING (payment_id) WHERE p.{key} IS NOT NULL
          )
        ) WHERE rid IS NOT NULL
    """


def _creator_sql() -> str:
    h = HISTORY_WINDOW
    width = WINDOWS[h]
    return f"""
        SELECT rid,
          n_win::DOUBLE AS creator_payments_{h},
          n_buyers::DOUBLE AS creator_distinct_buyers_{h},
          (n_win - n_buyers)::DOUBLE / n_win AS creator_repeat_share_{h},
          n_same_buyer::DOUBLE / n_win AS creator_buyer_share_{h}
        FROM (
          SELECT rid,
            count(*) OVER (PARTITION BY creator_id ORDER BY ts {_frame(width)}) AS n_win,
            {_distinct("creator_id", "user_id", width)} AS n_buyers,
            count(*) OVER (PARTITION BY creator_id, user_id ORDER BY ts {_frame(width)}) AS n_same_buyer
          FROM p WHERE creator_id IS NOT NULL
        )
    """


#: Request-time inputs of the on-demand features (column -> Feast type name).
REQUEST_INPUTS: dict[str, str] = {
    "payment_amount": "Float64",
    "payment_ts_us": "Int64",
    "card_bin_country": "String",
    "billing_country": "String",
    "ip_country": "String",
}
REQUEST_FEATURES = [
    "amount",
    "is_night",
    "is_weekend",
    "bin_billing_mismatch",
    "ip_bin_mismatch",
    "ip_billing_mismatch",
]


def request_features(inputs: pd.DataFrame) -> pd.DataFrame:
    """Features computed from the payment request alone (vectorised; also Feast's on-demand udf).

    Self-contained (own imports and constants): Feast runs the udf from its source text.
    """
    import numpy as np
    import pandas as pd

    hour = 3_600_000_000
    day = 24 * hour
    ts = inputs["payment_ts_us"].astype("int64")
    cents = np.floor(inputs["payment_amount"].astype("float64") * 100 + 0.5)
    bin_c, billing, ipc = inputs["card_bin_country"], inputs["billing_country"], inputs["ip_country"]

    def mismatch(a: pd.Series, b: pd.Series) -> np.ndarray:
        return np.where(a.notna() & b.notna(), (a != b).astype("float64"), np.nan)

    return pd.DataFrame(
        {
            "amount": cents / 100,
            "is_night": ((ts // hour) % 24 < 6).astype("float64"),
            "is_weekend": (((ts // day) + 3) % 7 >= 5).astype("float64"),
            "bin_billing_mismatch": mismatch(bin_c, billing),
            "ip_bin_mismatch": mismatch(ipc, bin_c),
            "ip_billing_mismatch": mismatch(ipc, billing),
        },
        index=inputs.index,
    )


def _request_sql() -> str:
    return """
        SELECT rid, amount AS payment_amount, ts AS payment_ts_us, card_bin_country, billing_country, ip_country
        FROM p
    """


def _items_sql() -> str:
    return f"""
        SELECT p.rid,
          len(p.item_ids)::DOUBLE AS items_count,
          agg.price_sum::DOUBLE / 100.0 AS items_price_sum,
          agg.price_max::DOUBLE / 100.0 AS items_price_max,
          (p.ts - agg.newest)::DOUBLE / {DAY} AS items_min_age_days
        FROM p LEFT JOIN (
          SELECT pi.rid, sum(i.price_cents) AS price_sum, max(i.price_cents) AS price_max,
                 max(i.created_ts) AS newest
          FROM (SELECT rid, unnest(item_ids) AS item_id FROM p) pi JOIN i USING (item_id)
          GROUP BY pi.rid
        ) agg USING (rid)
    """


def _load(con: duckdb.DuckDBPyConnection, events_dir: Path) -> tuple[int, set[str]]:
    """Create p (purchases, row id ``rid`` in time order), u (users), i (items), d (disputes).

    Returns the number of payments and the optional columns that hold any value (imported
    data sets have no devices or IPs: their features are then null without computing).
    """
    pay = table_path(events_dir, "payments")
    if not pay.exists():
        raise FeaturePipelineError(f"{pay} not found: simulate or import events first")

    def src(table: str) -> str:
        return str(table_path(events_dir, table)).replace("'", "''")

    con.execute(f"""
        CREATE TEMP TABLE p AS
        SELECT payment_id, user_id, card_fingerprint, device_id, ip, ip_country, card_bin_country,
               billing_country, creator_id, item_ids, payment_time,
               epoch_us(payment_time) AS ts,
               amount, floor(amount * 100 + 0.5)::BIGINT AS cents,
               (row_number() OVER (ORDER BY epoch_us(payment_time), payment_id) - 1)::BIGINT AS rid
        FROM read_parquet('{src("payments")}') WHERE kind = 'purchase'
    """)
    if table_path(events_dir, "users").exists():
        con.execute(f"""CREATE TEMP VIEW u AS SELECT user_id, epoch_us(signup_time) AS signup_ts,
                        kyc_status, country, is_guest FROM read_parquet('{src("users")}')""")
    else:
        con.execute("""CREATE TEMP VIEW u AS SELECT NULL::VARCHAR AS user_id, NULL::BIGINT AS signup_ts,
                       NULL::VARCHAR AS kyc_status, NULL::VARCHAR AS country, NULL::BOOLEAN AS is_guest
                       WHERE false""")
    if table_path(events_dir, "items").exists():
        con.execute(f"""CREATE TEMP VIEW i AS SELECT item_id, floor(price * 100 + 0.5)::BIGINT AS price_cents,
                        epoch_us(created_time) AS created_ts FROM read_parquet('{src("items")}')""")
    else:
        con.execute("""CREATE TEMP VIEW i AS SELECT NULL::VARCHAR AS item_id, NULL::BIGINT AS price_cents,
                       NULL::BIGINT AS created_ts WHERE false""")
    if table_path(events_dir, "disputes").exists():
        con.execute(f"""CREATE TEMP VIEW d AS SELECT payment_id, epoch_us(reported_time) AS reported_ts
                        FROM read_parquet('{src("disputes")}')""")
    else:
        con.execute(
            "CREATE TEMP VIEW d AS SELECT NULL::VARCHAR AS payment_id, NULL::BIGINT AS reported_ts WHERE false"
        )
    optional = ["card_fingerprint", "device_id", "ip", "ip_country", "creator_id"]
    counts = ", ".join(f"count({c})" for c in optional)
    row = con.execute(f"SELECT count(*), count(DISTINCT payment_id), {counts} FROM p").fetchone()
    assert row is not None
    if row[0] != row[1]:
        raise FeaturePipelineError(f"payments: {row[0] - row[1]} duplicate payment_id values")
    present = {c for c, k in zip(optional, row[2:], strict=True) if k}
    return int(row[0]), present


def _steps(present: set[str]) -> list[tuple[str, str]]:
    steps = [("request", _request_sql())]
    steps += [
        (f"{e} velocity", _velocity_sql(e))
        for e in VELOCITY_ENTITIES
        if JOIN_KEYS[e] in present | {"user_id"}
    ]
    steps += [("user history", _user_sql(present))]
    steps += [
        (f"{e} sharing", _distinct_users_sql(e)) for e in ("card", "device", "ip") if JOIN_KEYS[e] in present
    ]
    steps += [("user disputes", _disputes_sql("user"))]
    if "card_fingerprint" in present:
        steps += [("card disputes", _disputes_sql("card"))]
    if "creator_id" in present:
        steps += [("creator disputes", _disputes_sql("creator", CREATOR_DISPUTE_WINDOWS))]
        steps += [("creator concentration", _creator_sql())]
    steps += [("items", _items_sql())]
    return steps


def payment_feature_frame(
    events_dir: Path,
    *,
    threads: int | None = None,
    on_step: Callable[[str, int, int], None] | None = None,
    stats: list[BuildStats] | None = None,
    entity_keys: bool = False,
) -> pd.DataFrame:
    """One row per purchase: ``KEY_COLUMNS`` then every ``PAYMENT_FEATURES`` column (float64).

    ``entity_keys=True`` adds ``device_id``, ``ip`` and ``creator_id`` after the key columns
    (the Feast tables need them).
    Rows are ordered by (payment_time, payment_id). ``on_step(name, done, total)`` reports
    progress; ``stats`` (if given) receives the timing. Each step's result is scattered into
    preallocated columns by row id (no SQL join of a wide table).
    """
    started = time.perf_counter()
    con = duckdb.connect()
    try:
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        con.execute("SET preserve_insertion_order = false")
        n, present = _load(con, Path(events_dir))
        columns = {c: np.full(n, np.nan) for c in PAYMENT_FEATURE_NAMES}
        steps = _steps(present)
        for k, (label, sql) in enumerate(steps):
            if on_step:
                on_step(label, k, len(steps))
            # a relation materialises its result on every thread; execute().df() streams the
            # query on one thread (measured: velocity steps 1.6x faster on two cores)
            part = con.sql(sql).df()
            if label == "request":
                part = pd.concat([part[["rid"]], request_features(part)], axis=1)
            rid = part["rid"].to_numpy(dtype=np.int64)
            for c in part.columns.drop("rid"):
                columns[c][rid] = part[c].to_numpy(dtype=np.float64, na_value=np.nan)
            del part
        if on_step:
            on_step("keys", len(steps), len(steps))
        key_cols = KEY_COLUMNS + (EXTRA_KEY_COLUMNS if entity_keys else [])
        keys = con.sql(f"SELECT {', '.join(key_cols)} FROM p ORDER BY rid").df()
    finally:
        con.close()
    frame = pd.concat([keys, pd.DataFrame(columns, index=keys.index)], axis=1)
    if stats is not None:
        stats.append(BuildStats(n, time.perf_counter() - started))
    return frame


# --- the Feast feature set ----------------------------------------------------------------------

#: Data categories the consent tier "no_device_location" may not use (fideslang prefixes).
DEVICE_LOCATION_PREFIXES = ("user.device", "user.location")


def uses_device_or_location(f: FeatureDef) -> bool:
    """True if the feature is computed from device, IP or location data."""
    return any(c == p or c.startswith(p + ".") for c in f.categories for p in DEVICE_LOCATION_PREFIXES)


FRAUD_TIERS: dict[str, Callable[[FeatureDef], bool]] = {
    "full": lambda f: True,
    "no_device_location": lambda f: not uses_device_or_location(f),
}


def build_offline_tables(
    events_dir: Path, offline_dir: Path, on_step: Callable[[str, int, int], None] | None = None
) -> dict[str, object]:
    """Compute the payment features and write one Feast table per entity; report throughput."""
    stats: list[BuildStats] = []
    frame = payment_feature_frame(events_dir, on_step=on_step, stats=stats, entity_keys=True)
    rows = write_offline_tables(frame, FEATURE_SET, offline_dir)
    st = stats[0]
    return {
        "payments": st.payments,
        "seconds": round(st.seconds, 2),
        "payments_per_second": round(st.payments_per_second),
        "tables": rows,
    }


def fraud_tier_features(tier: str) -> list[str]:
    """Column names of the fraud model of one tier, in model order."""
    return [f.name for f in FEATURE_SET.tier_features(tier)]


FEATURE_SET = FeatureSet(
    model="fraud",
    features=tuple(PAYMENT_FEATURES),
    tiers=FRAUD_TIERS,
    request_inputs=REQUEST_INPUTS,
    request_fn=request_features,
    build_offline=build_offline_tables,
)
