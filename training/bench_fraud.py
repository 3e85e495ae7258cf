"""`aipic bench fraud-handbook`: the handbook's chapter-5 prequential benchmark.

Protocol (`../shared/data/README.md`, and the handbook's `get_train_test_set`):
- fold k (k = 0..n-1) starts training at ``train_start - 7k days``: 7 days of training,
  7 days of delay whose labels are not known yet, 7 days of test;
- on each test day D, cards with a fraud dated from the training start through D - 8 days
  are "known compromised" and their payments that day are removed from the test set;
- AUC ROC and average precision over all remaining test payments; card precision@100 per
  test day (cards caught on earlier test days removed), mean over the 7 days;
- every figure is the mean over the folds.

The aipic model goes through the project's own pipeline: the importer writes the event tables
(payments, disputes reported 7 days after each fraud), the payment feature pipeline computes
its inputs from those tables, and its training labels are the disputes *reported* by the end
of the delay (training end + 7 days). The logistic regression and random forest baselines use
the handbook's 15 features, computed here exactly as the handbook does.
"""

from __future__ import annotations

import datetime as dt
import json
import resource
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

DEFAULT_DATA = Path("../shared/data/fraud-handbook/transactions.parquet")
TEST_TRAIN_START = dt.date(2018, 8, 15)
VALIDATION_TRAIN_START = dt.date(2018, 7, 11)
TRAIN_DAYS = DELAY_DAYS = TEST_DAYS = 7
TOP_K = 100
DAY = np.int64(86_400)

# The handbook's published test results (README table): the bar to beat.
PUBLISHED: dict[str, dict[str, float]] = {
    "Logistic regression": {"auc_roc": 0.868, "average_precision": 0.623, "card_precision_at_100": 0.297},
    "Decision tree": {"auc_roc": 0.797, "average_precision": 0.579, "card_precision_at_100": 0.284},
    "Random forest": {"auc_roc": 0.870, "average_precision": 0.678, "card_precision_at_100": 0.299},
    "XGBoost": {"auc_roc": 0.869, "average_precision": 0.687, "card_precision_at_100": 0.303},
    "Balanced bagging": {"auc_roc": 0.879, "average_precision": 0.680, "card_precision_at_100": 0.305},
    "Weighted XGBoost": {"auc_roc": 0.872, "average_precision": 0.687, "card_precision_at_100": 0.300},
    "Feed-forward neural net": {"auc_roc": 0.876, "average_precision": 0.675, "card_precision_at_100": 0.303},
    "LSTM": {"auc_roc": 0.876, "average_precision": 0.665, "card_precision_at_100": 0.297},
}
METRICS = ("auc_roc", "average_precision", "card_precision_at_100")

HANDBOOK_FEATURES = [
    "TX_AMOUNT",
    "TX_DURING_WEEKEND",
    "TX_DURING_NIGHT",
    "CUSTOMER_ID_NB_TX_1DAY_WINDOW",
    "CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW",
    "CUSTOMER_ID_NB_TX_7DAY_WINDOW",
    "CUSTOMER_ID_AVG_AMOUNT_7DAY_WINDOW",
    "CUSTOMER_ID_NB_TX_30DAY_WINDOW",
    "CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW",
    "TERMINAL_ID_NB_TX_1DAY_WINDOW",
    "TERMINAL_ID_RISK_1DAY_WINDOW",
    "TERMINAL_ID_NB_TX_7DAY_WINDOW",
    "TERMINAL_ID_RISK_7DAY_WINDOW",
    "TERMINAL_ID_NB_TX_30DAY_WINDOW",
    "TERMINAL_ID_RISK_30DAY_WINDOW",
]
SOURCE_COLUMNS = [
    "TRANSACTION_ID",
    "TX_DATETIME",
    "CUSTOMER_ID",
    "TERMINAL_ID",
    "TX_AMOUNT",
    "TX_FRAUD",
    "TX_FRAUD_SCENARIO",
]


class BenchError(ValueError):
    """The benchmark cannot run as asked; the message says why (shown without a stack trace)."""


# --------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class Fold:
    """One prequential fold: [train_start, train_end) train, delay, [test_start, test_end) test."""

    index: int
    train_start: pd.Timestamp
    train_days: int = TRAIN_DAYS
    delay_days: int = DELAY_DAYS
    test_days: int = TEST_DAYS

    @property
    def train_end(self) -> pd.Timestamp:
        return self.train_start + pd.Timedelta(days=self.train_days)

    @property
    def label_cutoff(self) -> pd.Timestamp:
        """Labels (disputes) reported before this instant are known when the model is trained."""
        return self.train_end + pd.Timedelta(days=self.delay_days)

    @property
    def test_start(self) -> pd.Timestamp:
        return self.label_cutoff

    @property
    def test_end(self) -> pd.Timestamp:
        return self.test_start + pd.Timedelta(days=self.test_days)

    def describe(self) -> dict[str, str]:
        return {
            "train": f"{self.train_start.date()} .. {(self.train_end - pd.Timedelta(days=1)).date()}",
            "delay": f"{self.train_end.date()} .. {(self.test_start - pd.Timedelta(days=1)).date()}",
            "test": f"{self.test_start.date()} .. {(self.test_end - pd.Timedelta(days=1)).date()}",
        }


def fold_plan(first_train_start: dt.date | str, n_folds: int) -> list[Fold]:
    """Fold 0 starts training on ``first_train_start``; each further fold shifts back 7 days."""
    if n_folds < 1:
        raise BenchError("--folds must be at least 1")
    start = pd.Timestamp(first_train_start).normalize()
    return [Fold(k, start - pd.Timedelta(days=k * TEST_DAYS)) for k in range(n_folds)]


def day_index(times: pd.Series, origin: pd.Timestamp) -> npt.NDArray[np.int64]:
    """Whole days since ``origin`` midnight (the handbook's TX_TIME_DAYS when origin is day 0)."""
    delta = (times - origin.normalize()).to_numpy(dtype="timedelta64[s]").astype(np.int64)
    return np.floor_divide(delta, DAY)


def train_mask(times: pd.Series, fold: Fold) -> npt.NDArray[np.bool_]:
    return np.asarray((times >= fold.train_start) & (times < fold.train_end))


def assessment_mask(
    times: pd.Series, card: pd.Series, fraud: pd.Series, fold: Fold, delay_days: int = DELAY_DAYS
) -> npt.NDArray[np.bool_]:
    """Test-window payments minus those of cards already known to be compromised that day.

    A card is known compromised on test day D when it has a fraud dated on a day from the
    training start through D - (delay + 1): the handbook's `get_train_test_set`.
    """
    origin = fold.train_start
    day = day_index(times, origin)  # 0 = first training day
    in_test = np.asarray((times >= fold.test_start) & (times < fold.test_end))
    fraud_days = pd.Series(np.where(np.asarray(fraud) == 1, day, np.iinfo(np.int64).max))
    fraud_days[(day < 0)] = np.iinfo(np.int64).max  # frauds before the training start do not count
    first_fraud = fraud_days.groupby(np.asarray(card)).transform("min").to_numpy()
    known = first_fraud <= day - (delay_days + 1)
    return in_test & ~known


# --------------------------------------------------------------------------- handbook features


def _sorted_keys(
    group: npt.NDArray[np.int64], t: npt.NDArray[np.int64], pad: np.int64
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], np.int64]:
    """Order rows by (group, time, row) and build one int64 key per row so a searchsorted finds
    window bounds inside each group (``pad`` keeps windows from spilling into the previous group)."""
    order = np.lexsort((np.arange(t.size), t, group))
    span = np.int64(t.max() - t.min() + 2 * pad + 1)
    keys = group[order] * span + (t[order] - t.min() + pad)
    return order, keys, span


def handbook_features(
    time: pd.Series,
    card: pd.Series,
    terminal: pd.Series,
    amount: pd.Series,
    fraud: pd.Series,
    delay_days: int = DELAY_DAYS,
    windows: tuple[int, ...] = (1, 7, 30),
) -> pd.DataFrame:
    """The handbook's 15 inputs (chapter 3 "baseline feature transformation"), vectorised.

    - amount; weekend (Saturday/Sunday) and night (hour <= 6) flags;
    - per card, count and mean amount of payments in (t - w days, t], the current one included
      (pandas time-rolling semantics: later rows with the same timestamp are not included);
    - per terminal, count and fraud share of payments in (t - delay - w, t - delay]: only
      labels the delay has revealed (0 risk when the window is empty).
    """
    t = time.to_numpy(dtype="datetime64[s]").astype(np.int64)
    n = t.size
    out = pd.DataFrame(index=time.index)
    out["TX_AMOUNT"] = amount.to_numpy(dtype=np.float64)
    out["TX_DURING_WEEKEND"] = (time.dt.dayofweek >= 5).to_numpy(dtype=np.int64)
    out["TX_DURING_NIGHT"] = (time.dt.hour <= 6).to_numpy(dtype=np.int64)
    longest = np.int64((max(windows) + delay_days + 1) * DAY)

    card_codes = pd.factorize(card)[0].astype(np.int64)
    order, keys, _ = _sorted_keys(card_codes, t, longest)
    amt = out["TX_AMOUNT"].to_numpy()[order]
    csum = np.concatenate([[0.0], np.cumsum(amt)])
    pos = np.arange(n)
    for w in windows:
        lo = np.searchsorted(keys, keys - np.int64(w) * DAY, side="right")
        count = pos - lo + 1
        total = csum[pos + 1] - csum[lo]
        nb, avg = np.empty(n), np.empty(n)
        nb[order], avg[order] = count, total / count
        out[f"CUSTOMER_ID_NB_TX_{w}DAY_WINDOW"] = nb
        out[f"CUSTOMER_ID_AVG_AMOUNT_{w}DAY_WINDOW"] = avg

    term_codes = pd.factorize(terminal)[0].astype(np.int64)
    order, keys, _ = _sorted_keys(term_codes, t, longest)
    frauds = np.concatenate([[0.0], np.cumsum(np.asarray(fraud, dtype=np.float64)[order])])
    hi = np.searchsorted(keys, keys - np.int64(delay_days) * DAY, side="right")
    for w in windows:
        lo = np.searchsorted(keys, keys - np.int64(delay_days + w) * DAY, side="right")
        count = (hi - lo).astype(np.float64)
        bad = frauds[hi] - frauds[lo]
        risk = np.divide(bad, count, out=np.zeros(n), where=count > 0)
        nb, rk = np.empty(n), np.empty(n)
        nb[order], rk[order] = count, risk
        out[f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW"] = nb
        out[f"TERMINAL_ID_RISK_{w}DAY_WINDOW"] = rk
    return out[HANDBOOK_FEATURES]


def load_transactions(path: Path, max_cards: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Read the handbook parquet (optionally a random subset of cards, for quick runs and tests)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{path}: file not found (pass --data PATH to the handbook's transactions.parquet)")
    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise BenchError(f"{path}: not a readable parquet file ({exc})") from None
    missing = [c for c in SOURCE_COLUMNS if c not in names]
    if missing:
        raise BenchError(f"{path}: missing columns {missing}")
    df = pq.read_table(path, columns=SOURCE_COLUMNS).to_pandas()
    if max_cards is not None:
        cards = np.sort(df["CUSTOMER_ID"].unique())
        if max_cards < cards.size:
            keep = np.random.default_rng(seed).choice(cards, size=max_cards, replace=False)
            df = df[df["CUSTOMER_ID"].isin(keep)]
    df["TX_DATETIME"] = pd.to_datetime(df["TX_DATETIME"])
    return df.sort_values(["TX_DATETIME", "TRANSACTION_ID"], kind="stable", ignore_index=True)


# --------------------------------------------------------------------------- aipic inputs

#: Seller-compromise inputs the payment pipeline lacks (it has all-time and trailing dispute
#: counts, not their timing), computed from the same event tables. A sale is "matured" once
#: ``delay`` days old; it counts as disputed when its dispute was reported within ``delay`` days
#: of the sale, which is known for every matured sale: point-in-time correct by construction.
#: - the handbook's lagged windows: matured sales in (t - delay - w, t - delay], disputed share;
#: - the run of disputed sales at the end of the matured history, its length and age (a
#:   compromised seller shows a run of disputes; its age tells whether the compromise is over);
#: - disputed share of the last 5 matured sales, and days since the first disputed sale of the
#:   last ``CREATOR_ONSET_LOOKBACK_DAYS`` days.
CREATOR_LAG_WINDOWS = (1, 7, 30)
CREATOR_ONSET_LOOKBACK_DAYS = 42
CREATOR_RECENT_SALES = 5


def creator_history_feature_names(delay_days: int = DELAY_DAYS) -> list[str]:
    out = []
    for w in CREATOR_LAG_WINDOWS:
        out += [f"creator_lag{delay_days}d_payments_{w}d", f"creator_lag{delay_days}d_dispute_share_{w}d"]
    return [
        *out,
        "creator_matured_last_disputed",
        "creator_matured_disputed_run",
        "creator_days_since_disputed_run_start",
        f"creator_matured_dispute_share_last{CREATOR_RECENT_SALES}",
        "creator_days_since_first_recent_disputed_sale",
    ]


def creator_history_features(
    time: pd.Series, creator: pd.Series, dispute_reported: pd.Series, delay_days: int = DELAY_DAYS
) -> pd.DataFrame:
    """Seller-history inputs for every payment (see the block comment above), vectorised.

    ``dispute_reported`` is the reported time of each payment's dispute (NaT = none).
    """
    t = time.to_numpy(dtype="datetime64[s]").astype(np.int64)
    n = t.size
    reported = dispute_reported.to_numpy(dtype="datetime64[s]")
    rep = np.where(np.isnat(reported), np.iinfo(np.int64).max, reported.astype(np.int64))
    disputed = (rep <= t + np.int64(delay_days) * DAY).astype(np.int64)
    lookback = max(max(CREATOR_LAG_WINDOWS) + delay_days, CREATOR_ONSET_LOOKBACK_DAYS) + 1
    order, keys, span = _sorted_keys(pd.factorize(creator)[0].astype(np.int64), t, np.int64(lookback) * DAY)
    ts, q, idx = t[order], disputed[order], np.arange(n)
    cq = np.concatenate([[0], np.cumsum(q)])
    group_start = np.searchsorted(keys, (keys // span) * span, side="left")
    matured_end = np.searchsorted(keys, keys - np.int64(delay_days) * DAY, side="right")  # rows [start, end)
    cols: dict[str, npt.NDArray[np.float64]] = {}
    for w in CREATOR_LAG_WINDOWS:
        lo = np.searchsorted(keys, keys - np.int64(delay_days + w) * DAY, side="right")
        count = (matured_end - lo).astype(np.float64)
        bad = (cq[matured_end] - cq[lo]).astype(np.float64)
        cols[f"creator_lag{delay_days}d_payments_{w}d"] = count
        cols[f"creator_lag{delay_days}d_dispute_share_{w}d"] = np.divide(
            bad, count, out=np.zeros(n), where=count > 0
        )
    last = matured_end - 1
    has = last >= group_start
    last = np.where(has, last, 0)
    # length of the run of disputed sales ending at each row (reset at each seller's first row)
    last_clean = np.maximum.accumulate(np.maximum(np.where(q == 0, idx, -1), group_start - 1))
    run = np.where(has, (idx - last_clean)[last], 0)
    cols["creator_matured_last_disputed"] = np.where(has, q[last], np.nan)
    cols["creator_matured_disputed_run"] = np.where(has, run, np.nan)
    run_start = np.clip(last - run + 1, 0, n - 1)
    cols["creator_days_since_disputed_run_start"] = np.where(run > 0, (ts - ts[run_start]) / DAY, np.nan)
    lo_k = np.maximum(matured_end - CREATOR_RECENT_SALES, group_start)
    k = (matured_end - lo_k).astype(np.float64)
    cols[f"creator_matured_dispute_share_last{CREATOR_RECENT_SALES}"] = np.divide(
        (cq[matured_end] - cq[lo_k]).astype(np.float64), k, out=np.full(n, np.nan), where=k > 0
    )
    lo_onset = np.searchsorted(keys, keys - np.int64(CREATOR_ONSET_LOOKBACK_DAYS) * DAY, side="right")
    next_disputed = np.minimum.accumulate(np.where(q == 1, idx, n)[::-1])[::-1]
    first = next_disputed[np.minimum(lo_onset, n - 1)]
    ok = (lo_onset < n) & (first < matured_end)
    cols["creator_days_since_first_recent_disputed_sale"] = np.where(
        ok, (ts - ts[np.clip(first, 0, n - 1)]) / DAY, np.nan
    )
    out = pd.DataFrame(index=time.index)
    for name in creator_history_feature_names(delay_days):
        values = np.empty(n)
        values[order] = cols[name]
        out[name] = values
    return out


#: Card inputs beside the pipeline's (which compares an amount with the previous 30 days only):
#: the amount against the card's payments in (t - 60 d, t - 14 d], a baseline that a compromise
#: of the last two weeks has not contaminated, and the amount over the pipeline's 7/30-day means
#: as explicit ratios (trees split on ratios far better than on two separate columns).
CARD_BASELINE_DAYS = (60, 14)


def card_history_feature_names() -> list[str]:
    return [
        "card_amount_ratio_baseline",
        "card_amount_zscore_baseline",
        "card_payments_baseline",
        "card_amount_ratio_mean_7d",
        "card_amount_ratio_mean_30d",
    ]


def card_history_features(
    time: pd.Series, card: pd.Series, amount: pd.Series, mean_7d: pd.Series, mean_30d: pd.Series
) -> pd.DataFrame:
    """The card inputs above for every payment, vectorised (NaN without a baseline)."""
    t = time.to_numpy(dtype="datetime64[s]").astype(np.int64)
    a = amount.to_numpy(dtype=np.float64)
    n = t.size
    far, near = CARD_BASELINE_DAYS
    codes = pd.factorize(card)[0].astype(np.int64)  # -1 = no card: one group, blanked below
    order, keys, _ = _sorted_keys(codes, t, np.int64(far + 1) * DAY)
    x = a[order]
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])
    lo = np.searchsorted(keys, keys - np.int64(far) * DAY, side="right")
    hi = np.maximum(np.searchsorted(keys, keys - np.int64(near) * DAY, side="right"), lo)
    count = (hi - lo).astype(np.float64)
    mean = np.divide(s1[hi] - s1[lo], count, out=np.full(n, np.nan), where=count > 0)
    var = np.divide(s2[hi] - s2[lo], count, out=np.full(n, np.nan), where=count > 1) - mean * mean
    std = np.sqrt(np.maximum(var, 0.0))
    cols = {
        "card_amount_ratio_baseline": np.divide(x, mean, out=np.full(n, np.nan), where=mean > 0),
        "card_amount_zscore_baseline": np.divide(x - mean, std, out=np.full(n, np.nan), where=std > 0),
        "card_payments_baseline": count,
    }
    out = pd.DataFrame(index=time.index)
    for name, sorted_values in cols.items():
        values = np.empty(n)
        values[order] = sorted_values
        out[name] = np.where(codes < 0, np.nan, values)
    for w, m in (("7d", mean_7d), ("30d", mean_30d)):
        mv = m.to_numpy(dtype=np.float64)
        out[f"card_amount_ratio_mean_{w}"] = np.divide(a, mv, out=np.full(n, np.nan), where=mv > 0)
    return out


# --------------------------------------------------------------------------- the run

# Baselines as the handbook ran them (StandardScaler then the classifier), with the parameters
# its model selection favours; both re-checked on the VALIDATION folds (2018-07-11): LR C in
# {0.1, 1, 10, 100} within 0.002 AUC / 0.004 AP of each other (C=1 kept, the handbook's pick);
# RF 100 trees of depth 20 best on all three metrics of the {5,10,20,50} x {25,50,100} grid.
LR_C = 1.0
RF_TREES = 100
RF_DEPTH = 20


@dataclass(frozen=True)
class BenchConfig:
    """What `aipic bench fraud-handbook` runs; the defaults are the published protocol."""

    data: Path = DEFAULT_DATA
    train_start: dt.date = TEST_TRAIN_START
    folds: int = 4
    max_cards: int | None = None  # a random subset of cards, for quick runs and tests
    speed_rows: int = 1_000_000  # size of the one-model training-speed measurement (0 = skip)
    threads: int = 2
    early_stop_days: int = 1  # last days of each training week used for early stopping
    work_dir: Path | None = None  # where the imported events go (a temporary dir if None)
    seed: int = 0
    params: Any = None  # models.fraud.FraudParams; None = the tuned defaults


Step = Callable[[str], None]


def _baselines(threads: int, seed: int) -> dict[str, Any]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logistic_regression": make_pipeline(
            StandardScaler(), LogisticRegression(C=LR_C, max_iter=1000, random_state=seed)
        ),
        "random_forest": make_pipeline(
            StandardScaler(),
            RandomForestClassifier(
                n_estimators=RF_TREES, max_depth=RF_DEPTH, random_state=seed, n_jobs=max(threads, 1)
            ),
        ),
    }


def _scores(
    y: npt.NDArray[Any], score: npt.NDArray[Any], day: npt.NDArray[Any], card: npt.NDArray[Any]
) -> dict[str, float]:
    from models.metrics import auc_roc, average_precision, card_precision_at_k, recall_at_fpr

    return {
        "auc_roc": auc_roc(y, score),
        "average_precision": average_precision(y, score),
        "card_precision_at_100": card_precision_at_k(day, card, y, score, k=TOP_K).mean,
        "recall_at_1pct_fpr": recall_at_fpr(y, score, 0.01),
    }


def _mean(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in rows[0].items() if isinstance(v, int | float)]
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


@contextmanager
def _peak_rss() -> Iterator[dict[str, float]]:
    """Sample this process's RSS every 20 ms while the block runs; yields {'peak_mb', 'start_mb'}."""
    import psutil

    proc = psutil.Process()
    out = {"start_mb": proc.memory_info().rss / 2**20, "peak_mb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak_mb"] = max(out["peak_mb"], proc.memory_info().rss / 2**20)
            stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak_mb"] = max(out["peak_mb"], proc.memory_info().rss / 2**20)


def _check_range(tx: pd.DataFrame, folds: list[Fold]) -> None:
    first, last = tx["TX_DATETIME"].min(), tx["TX_DATETIME"].max()
    earliest, latest = min(f.train_start for f in folds), max(f.test_end for f in folds)
    if earliest < first.normalize() or latest > last.normalize() + pd.Timedelta(days=1):
        raise BenchError(
            f"folds need data from {earliest.date()} to {(latest - pd.Timedelta(days=1)).date()}; "
            f"{first.date()} .. {last.date()} available (change --train-start or --folds)"
        )


def aipic_frame(
    tx: pd.DataFrame, source: Path, work: Path, threads: int, step: Step
) -> tuple[pd.DataFrame, list[str], pd.Series, dict[str, float]]:
    """Import the source through the project's importer, run the payment feature pipeline and
    the seller-lag additions, and align everything with ``tx`` rows.

    Returns (features aligned with tx, feature names, dispute reported_time aligned with tx
    (NaT = none), timings).
    """
    from features.importers import handbook_numeric_id, import_fraud_handbook
    from features.payment_features import KEY_COLUMNS, payment_feature_frame
    from features.storage import read_table

    timings: dict[str, float] = {}
    events = work / "events"
    t0 = time.perf_counter()
    step("importing through features.importers.import_fraud_handbook")
    import_fraud_handbook(source, events)
    timings["import_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    step("payment feature pipeline (features.payment_features)")
    pf = payment_feature_frame(
        events,
        threads=threads,
        on_step=lambda name, k, n: step(f"payment features: {name} ({k + 1}/{n + 1})"),
    )
    step("seller history features")
    payments = read_table(events, "payments", columns=["payment_id", "payment_time", "creator_id", "kind"])
    payments = payments[payments["kind"] == "purchase"].reset_index(drop=True)
    disputes = read_table(events, "disputes", columns=["payment_id", "reported_time"])
    first_report = disputes.groupby("payment_id")["reported_time"].min()
    reported = payments["payment_id"].map(first_report)
    seller = creator_history_features(payments["payment_time"], payments["creator_id"], reported)
    seller.index = pd.Index(payments["payment_id"])
    cards = card_history_features(
        pf["payment_time"],
        pf["card_fingerprint"],
        pf["amount"],
        pf["card_amount_mean_7d"],
        pf["card_amount_mean_30d"],
    )
    cards.index = pd.Index(pf["payment_id"])
    timings["features_seconds"] = time.perf_counter() - t0

    candidates = [c for c in pf.columns if c not in KEY_COLUMNS]
    informative = [c for c in candidates if pf[c].notna().any() and pf[c].nunique(dropna=True) > 1]
    names = [*informative, *creator_history_feature_names(), *card_history_feature_names()]
    frame = pf.set_index("payment_id")[informative].join(seller, how="left").join(cards, how="left")
    frame["reported"] = first_report.reindex(frame.index).to_numpy()
    frame.index = pd.Index(handbook_numeric_id(pd.Series(frame.index)).to_numpy(), name="TRANSACTION_ID")
    missing = ~tx["TRANSACTION_ID"].isin(frame.index)
    if missing.any():
        raise BenchError(
            f"{int(missing.sum())} transactions have no pipeline features (import dropped them?)"
        )
    aligned = frame.loc[tx["TRANSACTION_ID"].to_numpy()].reset_index(drop=True)
    reported_naive = pd.to_datetime(aligned.pop("reported"), utc=True).dt.tz_convert(None)
    return aligned[names], names, reported_naive.set_axis(tx.index), timings


def _speed_test(
    x: pd.DataFrame, tx: pd.DataFrame, reported: pd.Series, names: list[str], cfg: BenchConfig, params: Any
) -> dict[str, Any]:
    """Train ONE aipic model on the earliest ~speed_rows payments (last 10 % of them, by time, for
    early stopping and calibration; labels known a delay after the slice ends)."""
    from models.fraud import FraudModel

    n = min(cfg.speed_rows, len(tx))
    order = np.argsort(tx["TX_DATETIME"].to_numpy(), kind="stable")[:n]
    cut = int(n * 0.9)
    end = tx["TX_DATETIME"].iloc[order[-1]] + pd.Timedelta(days=DELAY_DAYS)
    y = (reported.iloc[order] < end).to_numpy().astype(np.int8)
    xs = x.iloc[order]
    model = FraudModel(replace_params(params, num_threads=cfg.threads))
    with _peak_rss() as mem:
        t0 = time.perf_counter()
        model.fit(xs.iloc[:cut], y[:cut], xs.iloc[cut:], y[cut:])
        seconds = time.perf_counter() - t0
    return {
        "rows": n,
        "features": len(names),
        "threads": cfg.threads,
        "seconds": round(seconds, 2),
        "best_iteration": model.best_iteration_,
        "peak_rss_mb": round(mem["peak_mb"], 1),
        "rss_before_mb": round(mem["start_mb"], 1),
        "target_seconds": 180,
        "within_target": seconds < 180,
    }


def replace_params(params: Any, **changes: Any) -> Any:
    from dataclasses import replace

    from models.fraud import FraudParams

    return replace(params or FraudParams(), **changes)


def run_benchmark(cfg: BenchConfig, step: Step | None = None) -> dict[str, Any]:
    """Run the prequential benchmark; return the JSON-ready result document."""
    from features.importers import HANDBOOK_PATTERNS
    from models.fraud import FraudModel, FraudModelError
    from models.metrics import MetricError, calibration_error, recall_per_pattern

    say: Step = step or (lambda _m: None)
    started = time.perf_counter()
    folds = fold_plan(cfg.train_start, cfg.folds)
    say("reading transactions")
    tx = load_transactions(cfg.data, cfg.max_cards, cfg.seed)
    _check_range(tx, folds)
    params = replace_params(cfg.params, num_threads=cfg.threads)

    say("handbook features (baselines)")
    hb = handbook_features(
        tx["TX_DATETIME"], tx["CUSTOMER_ID"], tx["TERMINAL_ID"], tx["TX_AMOUNT"], tx["TX_FRAUD"]
    )
    days = day_index(tx["TX_DATETIME"], tx["TX_DATETIME"].min())

    with _work_dir(cfg.work_dir) as work:
        source = Path(cfg.data)
        if cfg.max_cards is not None:
            source = work / "subset.parquet"
            tx[SOURCE_COLUMNS].to_parquet(source, index=False)
        x_aipic, names, reported, timings = aipic_frame(tx, source, work, cfg.threads, say)

    per_fold: list[dict[str, Any]] = []
    for fold in folds:
        say(f"fold {fold.index + 1}/{len(folds)}: train {fold.describe()['train']}")
        tr = train_mask(tx["TX_DATETIME"], fold)
        te = assessment_mask(tx["TX_DATETIME"], tx["CUSTOMER_ID"], tx["TX_FRAUD"], fold)
        # labels only once known: a payment is fraud for training if its dispute was reported
        # before the end of the delay that follows the training week
        y_known = (reported < fold.label_cutoff).to_numpy().astype(np.int8)
        es = tr & np.asarray(tx["TX_DATETIME"] >= fold.train_end - pd.Timedelta(days=cfg.early_stop_days))
        fit = tr & ~es
        y_test = tx["TX_FRAUD"].to_numpy()[te]
        day_test, card_test = days[te], tx["CUSTOMER_ID"].to_numpy()[te]
        row: dict[str, Any] = {
            "fold": fold.index,
            **fold.describe(),
            "train_payments": int(tr.sum()),
            "train_frauds_known": int(y_known[tr].sum()),
            "test_payments": int(te.sum()),
            "test_frauds": int(y_test.sum()),
            "removed_known_compromised": int(
                (
                    np.asarray((tx["TX_DATETIME"] >= fold.test_start) & (tx["TX_DATETIME"] < fold.test_end))
                    & ~te
                ).sum()
            ),
        }
        try:
            t0 = time.perf_counter()
            model = FraudModel(params).fit(x_aipic[fit], y_known[fit], x_aipic[es], y_known[es])
            fit_seconds = time.perf_counter() - t0
            raw = model.raw_score(x_aipic[te])
            prob = model.predict_proba(x_aipic[te])[:, 1]
            aipic: dict[str, Any] = dict(_scores(y_test, raw, day_test, card_test))
            aipic["calibration_error"] = calibration_error(y_test, prob)
            threshold = np.quantile(raw[y_test == 0], 0.99)  # the 1 %-FPR operating point
            patterns = tx["TX_FRAUD_SCENARIO"].to_numpy()[te]
            aipic["recall_per_pattern_at_1pct_fpr"] = recall_per_pattern(
                pd.Series(patterns).map({k: v.value for k, v in HANDBOOK_PATTERNS.items()}), raw >= threshold
            )
            row["aipic"] = {
                **aipic,
                "best_iteration": model.best_iteration_,
                "fit_seconds": round(fit_seconds, 2),
            }
            for name, clf in _baselines(cfg.threads, cfg.seed).items():
                clf.fit(hb[HANDBOOK_FEATURES].to_numpy()[tr], y_known[tr])
                score = clf.predict_proba(hb[HANDBOOK_FEATURES].to_numpy()[te])[:, 1]
                row[name] = _scores(y_test, score, day_test, card_test)
        except (FraudModelError, MetricError) as exc:
            raise BenchError(f"fold {fold.index} ({fold.describe()['train']}): {exc}") from None
        per_fold.append(row)

    result: dict[str, Any] = {
        "protocol": {
            "data": str(cfg.data),
            "train_start": str(pd.Timestamp(cfg.train_start).date()),
            "folds": cfg.folds,
            "train_days": TRAIN_DAYS,
            "delay_days": DELAY_DAYS,
            "test_days": TEST_DAYS,
            "max_cards": cfg.max_cards,
            "transactions": len(tx),
            "early_stop_days": cfg.early_stop_days,
        },
        "aipic": _mean([f["aipic"] for f in per_fold]),
        "logistic_regression": _mean([f["logistic_regression"] for f in per_fold]),
        "random_forest": _mean([f["random_forest"] for f in per_fold]),
        "published": PUBLISHED,
        "per_fold": per_fold,
        "aipic_features": names,
        "aipic_params": asdict(params),
        "baseline_params": {
            "logistic_regression": {"C": LR_C},
            "random_forest": {"n_estimators": RF_TREES, "max_depth": RF_DEPTH},
        },
    }
    recalls = pd.DataFrame([f["aipic"]["recall_per_pattern_at_1pct_fpr"] for f in per_fold])
    result["aipic"]["recall_per_pattern_at_1pct_fpr"] = {str(k): float(v) for k, v in recalls.mean().items()}
    result["beats_every_published_row"] = {
        m: all(result["aipic"][m] > row[m] for row in PUBLISHED.values()) for m in METRICS
    }
    if cfg.speed_rows > 0:
        say(f"training speed: one model on {min(cfg.speed_rows, len(tx)):,} payments")
        speed = _speed_test(x_aipic, tx, reported, names, cfg, params)
        result["speed"] = speed
        result["training_seconds"] = speed["seconds"]
        result["peak_rss_mb"] = speed["peak_rss_mb"]
    result["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["timings"] = {k: round(v, 1) for k, v in timings.items()}
    result["timings"]["total_seconds"] = round(time.perf_counter() - started, 1)
    return result


@contextmanager
def _work_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    from features.settings import get_settings

    base = get_settings().var_dir / "bench"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fraud-handbook-", dir=base) as tmp:
        yield Path(tmp)


def write_json(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))


def result_table(result: dict[str, Any]) -> Any:
    """A rich table: the three measured models, then the published rows."""
    from rich.table import Table

    p = result["protocol"]
    title = (
        f"fraud-handbook prequential benchmark ({p['folds']} folds from {p['train_start']}, mean over folds)"
    )
    table = Table(title=title)
    table.add_column("model")
    for label in ("AUC ROC", "AP", "CP@100"):
        table.add_column(label, justify="right")
    best = {m: max(r[m] for r in PUBLISHED.values()) for m in METRICS}
    for key, label in (
        ("aipic", "aipic LightGBM (project pipeline)"),
        ("logistic_regression", "Logistic regression (measured)"),
        ("random_forest", "Random forest (measured)"),
    ):
        r = result[key]
        cells = [
            f"[bold green]{r[m]:.3f}[/]" if key == "aipic" and r[m] > best[m] else f"{r[m]:.3f}"
            for m in METRICS
        ]
        table.add_row(label, *cells, style="bold" if key == "aipic" else None)
    table.add_section()
    for name, r in PUBLISHED.items():
        table.add_row(f"{name} (published)", *(f"{r[m]:.3f}" for m in METRICS), style="dim")
    return table


def run_fraud_handbook_cli(
    data: Path,
    train_start: str,
    folds: int,
    json_out: Path | None,
    max_cards: int | None,
    speed_rows: int,
    threads: int,
) -> dict[str, Any]:
    """Body of `aipic bench fraud-handbook`: progress on stderr, table and verdict on stdout."""
    import os

    # OpenMP threads that spin while waiting collapse when the 2 cores are shared with other
    # work (measured: 200 rounds took 205 s with 2 spinning threads, 5 s passive). Must be set
    # before LightGBM loads the OpenMP runtime; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import typer
    from rich.console import Console

    err = Console(stderr=True)
    try:
        start = dt.date.fromisoformat(train_start)
    except ValueError:
        typer.secho(f"error: --train-start {train_start!r} is not a date (YYYY-MM-DD)", fg="red", err=True)
        raise typer.Exit(code=2) from None
    cfg = BenchConfig(
        data=data, train_start=start, folds=folds, max_cards=max_cards, speed_rows=speed_rows, threads=threads
    )
    try:
        with err.status("fraud-handbook benchmark") as status:

            def step(message: str) -> None:
                status.update(message)
                err.log(message)

            result = run_benchmark(cfg, step)
    except BenchError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(code=2) from None
    out = Console()
    out.print(result_table(result))
    verdict = result["beats_every_published_row"]
    names = {"auc_roc": "AUC ROC", "average_precision": "AP", "card_precision_at_100": "CP@100"}
    out.print(
        "aipic beats every published row on: "
        + ", ".join(f"{names[m]} {'yes' if ok else 'NO'}" for m, ok in verdict.items())
    )
    if "speed" in result:
        s = result["speed"]
        out.print(
            f"training one LightGBM model on {s['rows']:,} payments x {s['features']} features "
            f"({s['threads']} threads): {s['seconds']:.1f} s, peak RSS {s['peak_rss_mb']:.0f} MB "
            f"({'within' if s['within_target'] else 'OVER'} the {s['target_seconds']} s target)"
        )
    t = result["timings"]
    out.print(
        f"import {t['import_seconds']:.0f} s, feature pipeline {t['features_seconds']:.0f} s, "
        f"total {t['total_seconds']:.0f} s; process peak RSS {result['process_peak_rss_mb']:.0f} MB"
    )
    if json_out is not None:
        write_json(result, json_out)
        out.print(f"written {json_out}")
    return result
