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
from dataclasses import dataclass
from pathlib import Path

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


def test_mask(
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
