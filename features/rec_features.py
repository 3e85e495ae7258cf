"""Recommendation features: declarations (`REC_FEATURES`) and their point-in-time computation.

Why one module for both: the ranker, the benchmark, serving and the privacy registry must agree
on what each input is and which personal data it uses. The offline part builds a `RecState`, a
snapshot of the event tables strictly before a request time (sparse user × item matrices,
item-item co-purchase / co-view neighbours, item popularity), and `pair_features` turns
(user, item, context) triples into the model matrix. Serving one request and building a training
set of a million rows go through the same `pair_features`, so they cannot drift apart.

A snapshot has two sides. The item side (`Catalogue`: items, `item_*` statistics, item-item
graphs) is shared by every request and built by the feature build. The person side
(`UserSide`, from `user_side`) is row-local: a person's rows depend on their own interactions
only, so serving builds them per request from the person's history row (`person_state`), and
`build_state(events, t, catalogue=...)` builds the same rows for everybody as of t.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.definitions import FeatureDef

Tier = Literal["personalized", "limited"]
TIERS: tuple[Tier, ...] = ("personalized", "limited")

PURCHASES = ("user.behavior.purchase_history", "user.unique_id.pseudonymous")
BROWSING = ("user.behavior.browsing_history", "user.unique_id.pseudonymous")
BEHAVIOUR = (
    "user.behavior.purchase_history",
    "user.behavior.browsing_history",
    "user.unique_id.pseudonymous",
)
NONE: tuple[str, ...] = ()

_F = FeatureDef
REC_FEATURES: list[FeatureDef] = [
    # Item only: aggregates over every buyer, nothing about the person asking.
    _F("item_pop_1d", "item", "Distinct buyers of the item in the last day.", NONE, "derived"),
    _F("item_pop_7d", "item", "Distinct buyers of the item in the last 7 days.", NONE, "derived"),
    _F("item_pop_30d", "item", "Distinct buyers of the item in the last 30 days.", NONE, "derived"),
    _F("item_pop_all", "item", "Distinct buyers of the item since it was listed.", NONE, "derived"),
    _F(
        "item_new_buyers_30d",
        "item",
        "Persons who bought the item for the first time in 30 days.",
        NONE,
        "derived",
    ),
    _F("item_trend", "item", "7-day buyers over the 30-day weekly average (>1 = rising).", NONE, "derived"),
    _F("item_views_7d", "item", "Views of the item in the last 7 days.", NONE, "derived"),
    _F("item_age_days", "item", "Days since the item was listed.", NONE, "derived"),
    _F("item_log_price", "item", "Log of the item's list price.", NONE, "derived"),
    _F(
        "item_repeat_share",
        "item",
        "Share of the item's buyers who bought it more than once.",
        NONE,
        "derived",
    ),
    _F("item_rebuy_gap_days", "item", "Median days between repeat purchases of the item.", NONE, "derived"),
    _F(
        "item_style_pop_7d",
        "item",
        "Share of last week's buyers who bought the item's style.",
        NONE,
        "derived",
    ),
    # The person's own history.
    _F("user_n_purchases", "user", "Purchase events of the person.", PURCHASES, "observed"),
    _F("user_n_items", "user", "Distinct items the person bought.", PURCHASES, "observed"),
    _F(
        "user_repeat_share",
        "user",
        "Share of the person's purchases that were repeats.",
        PURCHASES,
        "derived",
    ),
    _F("user_days_since_purchase", "user", "Days since the person's last purchase.", PURCHASES, "observed"),
    _F("user_days_since_first", "user", "Days since the person's first purchase.", PURCHASES, "observed"),
    _F("user_price_band", "user", "Median log price of what the person bought.", PURCHASES, "derived"),
    _F("user_n_views_30d", "user", "Views by the person in the last 30 days.", BROWSING, "observed"),
    _F("user_days_since_view", "user", "Days since the person's last view.", BROWSING, "observed"),
    # The person × the candidate item.
    _F("ui_n_purchases", "user_item", "Times the person bought this item.", PURCHASES, "observed"),
    _F("ui_quantity", "user_item", "Units of this item the person bought.", PURCHASES, "observed"),
    _F("ui_decay_purchases", "user_item", "Time-decayed purchases of this item.", PURCHASES, "derived"),
    _F("ui_days_since_purchase", "user_item", "Days since the person last bought it.", PURCHASES, "observed"),
    _F("ui_days_since_first", "user_item", "Days since the person first bought it.", PURCHASES, "observed"),
    _F(
        "ui_rebuy_due", "user_item", "Days since last bought over the item's rebuy gap.", PURCHASES, "derived"
    ),
    _F("ui_n_views", "user_item", "Times the person viewed this item.", BROWSING, "observed"),
    _F("ui_liked_or_carted", "user_item", "The person liked it or put it in the cart.", BROWSING, "observed"),
    _F(
        "ui_copurchase",
        "user_item",
        "Decayed co-purchase similarity to the person's buys.",
        PURCHASES,
        "derived",
    ),
    _F(
        "ui_copurchase_mean",
        "user_item",
        "Mean co-purchase similarity to the person's items.",
        PURCHASES,
        "derived",
    ),
    _F(
        "ui_ease",
        "user_item",
        "EASE item-item score of the item given the person's buys.",
        PURCHASES,
        "derived",
    ),
    _F("ui_ease_decay", "user_item", "EASE score with recent buys weighted more.", PURCHASES, "derived"),
    _F(
        "ui_ease_rel",
        "user_item",
        "EASE score over the person's best EASE score over all items.",
        PURCHASES,
        "derived",
    ),
    _F(
        "ui_coview",
        "user_item",
        "Decayed co-view similarity to what the person viewed.",
        BEHAVIOUR,
        "derived",
    ),
    _F(
        "ui_style_affinity",
        "user_item",
        "Decayed share of the person's activity in the style.",
        BEHAVIOUR,
        "derived",
    ),
    _F("ui_creator_affinity", "user_item", "Decayed share of activity on the creator.", BEHAVIOUR, "derived"),
    _F("ui_price_gap", "user_item", "Item log price minus the person's price band.", PURCHASES, "derived"),
    # The request's own context (the item on screen): no profile involved.
    _F("ctx_copurchase", "request", "Co-purchase similarity to the item being viewed.", NONE, "derived"),
    _F("ctx_coview", "request", "Co-view similarity to the item being viewed.", NONE, "derived"),
    _F("ctx_same_style", "request", "Same style as the item being viewed.", NONE, "derived"),
    _F("ctx_same_creator", "request", "Same creator as the item being viewed.", NONE, "derived"),
    _F("ctx_price_gap", "request", "Log price gap to the item being viewed.", NONE, "derived"),
]
REC_FEATURES_BY_NAME: dict[str, FeatureDef] = {f.name: f for f in REC_FEATURES}


def tier_features(tier: Tier) -> list[FeatureDef]:
    """The inputs a tier may use: `limited` keeps only features without any personal category."""
    if tier == "personalized":
        return list(REC_FEATURES)
    if tier == "limited":
        return [f for f in REC_FEATURES if not f.categories]
    raise ValueError(f"unknown tier {tier!r}; known: {TIERS}")


def tier_feature_names(tier: Tier) -> list[str]:
    return [f.name for f in tier_features(tier)]


# --------------------------------------------------------------------------------------------
# Event tables in, snapshot out.


class RecDataError(ValueError):
    """Event tables cannot feed the recommender (missing columns, empty history)."""


@dataclass(frozen=True)
class RecEvents:
    """The event tables the recommender reads (a subset of the marketplace event model)."""

    interactions: pd.DataFrame  # user_id, item_id, event_type, event_time, quantity
    items: pd.DataFrame  # item_id, creator_id, style, price, created_time, status
    creators: pd.DataFrame | None = None  # creator_id, user_id (a creator's own buyer account)

    @classmethod
    def from_dir(cls, directory: Path) -> RecEvents:
        from features.storage import read_table, table_path

        inter = read_table(
            directory, "interactions", ["user_id", "item_id", "event_type", "event_time", "quantity"]
        )
        items = read_table(
            directory, "items", ["item_id", "creator_id", "style", "price", "created_time", "status"]
        )
        creators = (
            read_table(directory, "creators", ["creator_id", "user_id"])
            if table_path(directory, "creators").exists()
            else None
        )
        return cls(inter, items, creators).checked()

    def checked(self) -> RecEvents:
        need = {
            "interactions": (
                {"user_id", "item_id", "event_type", "event_time", "quantity"},
                self.interactions,
            ),
            "items": ({"item_id", "creator_id", "style", "price", "created_time", "status"}, self.items),
        }
        for name, (cols, df) in need.items():
            missing = cols - set(df.columns)
            if missing:
                raise RecDataError(f"{name}: missing columns {sorted(missing)}")
        return self


HALF_LIFE_DAYS = 45.0
NEIGHBOURS = 100  # kept per item in the co-purchase / co-view graphs
EASE_LAMBDA = 500.0
EASE_MAX_ITEMS = 5000  # EASE inverts an items × items matrix: only the most bought items
EASE_NEIGHBOURS = 200
EVENT_WEIGHT = {"view": 1.0, "like": 2.0, "add_to_cart": 2.0, "purchase": 3.0}
#: Fixed sort codes of event types (canonical event order); other types sort last.
EVENT_CODES = {"view": 0, "like": 1, "add_to_cart": 2, "purchase": 3}


@dataclass
class Catalogue:
    """The item side of a snapshot: what every request shares, built once as of `as_of`.

    Item attributes and `item_*` statistics, the item-item graphs (co-purchase, co-view,
    EASE) and who owns which creator account. The graphs are whole-catalogue structures that
    change with every purchase of anybody and cost an EASE inversion to rebuild, so they are a
    model-side artifact (`save` / `load`), not Feast rows; the `item_*` statistics are also
    written to the Feast view ``recommender_item`` by the feature build.
    """

    as_of: pd.Timestamp
    items: pd.Index
    item_creator: np.ndarray  # int codes into `creators`
    creators: pd.Index
    item_style: np.ndarray  # int codes into `styles`
    styles: pd.Index
    item_active: np.ndarray  # bool: listed and active
    item_created_days: np.ndarray  # days before as_of the item was listed
    item_stats: dict[str, np.ndarray]  # item_* feature columns, one value per item
    copurchase: sp.csr_matrix  # items × items cosine, top neighbours per row
    coview: sp.csr_matrix
    ease: sp.csr_matrix  # items × items EASE weights (positive, top neighbours per row)
    creator_owner: dict[str, np.ndarray]  # user_id -> creator codes the person owns
    half_life_days: float = HALF_LIFE_DAYS
    derived: dict[str, Any] = field(default_factory=dict, repr=False)  # lazily built item lookups

    def save(self, path: Path) -> None:
        """Write the artifact atomically (pickle: scipy matrices and pandas indexes as they are)."""
        import pickle

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        state = {k: v for k, v in self.__dict__.items() if k != "derived"}
        with tmp.open("wb") as fh:
            pickle.dump(
                {"format": CATALOGUE_FORMAT, "catalogue": state}, fh, protocol=pickle.HIGHEST_PROTOCOL
            )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Catalogue:
        """Read an artifact written by `save` (the project's own file, never user input)."""
        import pickle

        if not path.exists():
            raise RecDataError(f"recommender catalogue {path} not found: run `aipic features build` first")
        with path.open("rb") as fh:
            raw = pickle.load(fh)  # the feature build of this deployment wrote it
        if not isinstance(raw, dict) or raw.get("format") != CATALOGUE_FORMAT:
            raise RecDataError(f"{path}: not a recommender catalogue of format {CATALOGUE_FORMAT}")
        return cls(**raw["catalogue"])


CATALOGUE_FORMAT = 1


@dataclass(frozen=True)
class History:
    """Interactions as parallel arrays: a whole event table, or one person's Feast history row."""

    user_id: np.ndarray  # str
    item_id: np.ndarray  # str
    event_type: np.ndarray  # str (view, like, add_to_cart, purchase)
    ts_us: np.ndarray  # int64 microseconds since the epoch, UTC
    quantity: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.ts_us)

    @classmethod
    def from_frame(cls, inter: pd.DataFrame) -> History:
        """From an interactions table (event_time as datetimes, quantity may be missing)."""
        return cls(
            user_id=inter["user_id"].astype(str).to_numpy(dtype=object),
            item_id=inter["item_id"].astype(str).to_numpy(dtype=object),
            event_type=inter["event_type"].astype(str).to_numpy(dtype=object),
            ts_us=to_us(inter["event_time"]),
            quantity=inter["quantity"].fillna(1).to_numpy(np.float64),
        )

    @classmethod
    def of_person(
        cls,
        user_id: str,
        item_id: Sequence[str],
        event_type: Sequence[str],
        ts_us: Sequence[int],
        quantity: Sequence[float],
    ) -> History:
        """One person's history as stored in the Feast view ``recommender_user_history``."""
        n = len(ts_us)
        return cls(
            user_id=np.full(n, user_id, dtype=object),
            item_id=np.asarray(item_id, dtype=object),
            event_type=np.asarray(event_type, dtype=object),
            ts_us=np.asarray(ts_us, dtype=np.int64),
            quantity=np.asarray(quantity, dtype=np.float64),
        )

    def take(self, mask: np.ndarray) -> History:
        return History(
            self.user_id[mask],
            self.item_id[mask],
            self.event_type[mask],
            self.ts_us[mask],
            self.quantity[mask],
        )


_EPOCH = pd.Timestamp("1970-01-01", tz="UTC")
US_PER_DAY = 86_400_000_000


def to_us(times: pd.Series) -> np.ndarray:
    """Exact integer microseconds since the epoch (naive times are UTC)."""
    return ((_utc_series(times) - _EPOCH) // pd.Timedelta(microseconds=1)).to_numpy(np.int64)


def ts_to_us(ts: pd.Timestamp | str) -> int:
    return int((_as_utc(ts) - _EPOCH) // pd.Timedelta(microseconds=1))


@dataclass
class UserSide:
    """What the snapshot knows about persons: their rows of every user × item / style / creator
    matrix and their `user_*` statistics. Row-local: a person's rows depend on their own
    events only, so one person's history gives exactly their rows of the full snapshot."""

    users: pd.Index
    user_stats: dict[str, np.ndarray]  # user_* feature columns, one value per user
    buys: sp.csr_matrix  # users × items purchase events
    bought: sp.csr_matrix  # binary version of `buys`
    qty: sp.csr_matrix
    buys_decay: sp.csr_matrix
    last_buy: sp.csr_matrix  # 1 + days since last purchase (0 = never)
    first_buy: sp.csr_matrix
    views: sp.csr_matrix
    views_decay: sp.csr_matrix
    liked: sp.csr_matrix
    style_aff: sp.csr_matrix  # users × styles, decayed activity share
    creator_aff: sp.csr_matrix  # users × creators


@dataclass
class RecState(UserSide):
    """Everything the recommender knows as of `as_of` (events strictly before it): the persons'
    side (`UserSide`, its fields inherited) and the catalogue's fields."""

    as_of: pd.Timestamp
    items: pd.Index
    item_creator: np.ndarray  # int codes into `creators`
    creators: pd.Index
    item_style: np.ndarray  # int codes into `styles`
    styles: pd.Index
    item_active: np.ndarray  # bool: listed and active
    item_created_days: np.ndarray  # days before as_of the item was listed
    item_stats: dict[str, np.ndarray]  # item_* feature columns, one value per item
    copurchase: sp.csr_matrix  # items × items cosine, top neighbours per row
    coview: sp.csr_matrix
    ease: sp.csr_matrix  # items × items EASE weights (positive, top neighbours per row)
    creator_owner: dict[str, np.ndarray]  # user_id -> creator codes the person owns
    derived: dict[str, Any] = field(default_factory=dict, repr=False)  # lazily built item lookups
    catalogue_as_of: pd.Timestamp | None = None  # when the item side was built (default: as_of)
    half_life_days: float = HALF_LIFE_DAYS
    user_memo: dict[tuple[str, str, int], np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def assemble(cls, cat: Catalogue, people: UserSide, as_of: pd.Timestamp) -> RecState:
        """A state from a (shared) catalogue and the persons' side as of `as_of`.

        The catalogue's lazily built lookups are shared, not copied: a request's state costs
        only its person's rows.
        """
        shared = {f.name: getattr(cat, f.name) for f in fields(Catalogue) if f.name != "as_of"}
        own = {f.name: getattr(people, f.name) for f in fields(UserSide)}
        return cls(as_of=as_of, catalogue_as_of=cat.as_of, **shared, **own)

    def catalogue(self) -> Catalogue:
        """The item side of this state (sharing its lookups)."""
        as_of = self.catalogue_as_of if self.catalogue_as_of is not None else self.as_of
        shared = {f.name: getattr(self, f.name) for f in fields(Catalogue) if f.name != "as_of"}
        return Catalogue(as_of=as_of, **shared)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def creator_items(self) -> sp.csr_matrix:
        """Creators × items membership (for 'never the person's own pictures')."""
        if "creator_items" not in self.derived:
            ones = np.ones(self.n_items, dtype=np.float32)
            self.derived["creator_items"] = sp.csr_matrix(
                (ones, (self.item_creator, np.arange(self.n_items))), shape=(len(self.creators), self.n_items)
            )
        return self.derived["creator_items"]

    def user_graph(self, user_key: str, graph_key: str, row: int) -> np.ndarray:
        """Dense (user matrix row @ item graph), memoised: candidates and features of one
        request need the same products, and a heavy buyer's costs a millisecond."""
        memo = self.user_memo
        key = (user_key, graph_key, row)
        hit = memo.get(key)
        if hit is None:
            if len(memo) >= 32:  # a few requests' worth; the snapshot itself never changes
                memo.clear()
            hit = memo[key] = row_graph(getattr(self, user_key), row, getattr(self, graph_key))
        return hit

    def transposed(self, name: str) -> sp.csr_matrix:
        """CSR of the transpose of an item-item graph: its row i is the graph's column i."""
        key = f"{name}.T"
        if key not in self.derived:
            self.derived[key] = sp.csr_matrix(getattr(self, name).T)
        return self.derived[key]

    def user_row(self, user_id: str | None) -> int:
        """Row of a user, or -1 for an unknown person (cold start)."""
        if user_id is None:
            return -1
        if len(self.users) == 1:  # a request's state: its one person or nobody
            return 0 if self.users[0] == user_id else -1
        return int(self.users.get_indexer(pd.Index([user_id]))[0])

    def item_col(self, item_id: str | None) -> int:
        if item_id is None:
            return -1
        return _item_positions(self.derived, self.items).get(item_id, -1)

    def item_cols(self, item_ids: Sequence[str]) -> np.ndarray:
        """Columns of items (-1 for unknown ones)."""
        positions = _item_positions(self.derived, self.items)
        return np.fromiter((positions.get(i, -1) for i in item_ids), np.int64, len(item_ids))


def _days_before(times: pd.Series, as_of: pd.Timestamp) -> np.ndarray:
    return ((as_of - times).dt.total_seconds() / 86400.0).to_numpy(np.float64)


def _as_utc(ts: pd.Timestamp | str) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _utc_series(s: pd.Series) -> pd.Series:
    s = pd.to_datetime(s)
    return s.dt.tz_localize("UTC") if s.dt.tz is None else s.dt.tz_convert("UTC")


_ONE_ROW: dict[int, sp.csr_matrix] = {}


def _one_row(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """A 1 × n_cols CSR matrix from arrays known to be canonical (sorted, unique int32 columns).

    Why not the constructor: its format checks cost ~17 µs per matrix and a request builds a
    dozen for its person; a copy of an empty matrix of that shape with the arrays swapped in
    (public attributes only) is the same matrix.
    """
    empty = _ONE_ROW.get(n_cols)
    if empty is None:
        if len(_ONE_ROW) >= 64:  # a few catalogues' item, style and creator counts
            _ONE_ROW.clear()
        empty = _ONE_ROW[n_cols] = sp.csr_matrix((1, n_cols), dtype=np.float32)
    m = copy.copy(empty)
    m.data, m.indices, m.indptr = data, indices, indptr
    return m


@dataclass(frozen=True)
class _Pairs:
    """Triplets grouped by (row, column): their stable sorted order and where each pair starts.

    One grouping serves every matrix over the same (row, column) pairs (a person's purchases
    give their counts, quantities, decayed counts, first and last purchase), and the matrices
    share its `indices` / `indptr` arrays (never modified in place).
    """

    shape: tuple[int, int]
    order: np.ndarray
    starts: np.ndarray
    indices: np.ndarray  # int32 column of each pair, sorted by (row, column)
    indptr: np.ndarray  # int32

    @classmethod
    def of(cls, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> _Pairs:
        key = rows.astype(np.int64) * np.int64(shape[1]) + cols
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = (
            np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1]))) if len(k) else np.empty(0, np.int64)
        )
        uk = k[starts]
        indptr = np.zeros(shape[0] + 1, dtype=np.int32)
        np.cumsum(np.bincount(uk // shape[1], minlength=shape[0]), out=indptr[1:])
        return cls(shape, order, starts, (uk % shape[1]).astype(np.int32), indptr)

    def _matrix(self, vals: np.ndarray) -> sp.csr_matrix:
        if len(self.order) == 0:
            return sp.csr_matrix(self.shape, dtype=np.float32)
        if self.shape[0] == 1:  # one person's row (every request): skip scipy's format checks
            return _one_row(vals.astype(np.float32), self.indices, self.indptr, self.shape[1])
        return sp.csr_matrix(
            (vals.astype(np.float32), self.indices, self.indptr), shape=self.shape, copy=False
        )

    def total(self, vals: np.ndarray) -> np.ndarray:
        """Per pair, the float64 sum of its values in input order."""
        if len(self.order) == 0:
            return np.empty(0)
        return np.add.reduceat(np.asarray(vals, dtype=np.float64)[self.order], self.starts)

    def sum(self, vals: np.ndarray) -> sp.csr_matrix:
        """Duplicates summed in float64 in input order, then float32."""
        return self._matrix(self.total(vals))

    def max(self, vals: np.ndarray) -> sp.csr_matrix:
        """Duplicates max-reduced."""
        if len(self.order) == 0:
            return self._matrix(np.empty(0))
        return self._matrix(np.maximum.reduceat(np.asarray(vals, dtype=np.float64)[self.order], self.starts))

    def ones(self) -> sp.csr_matrix:
        """1 for every pair (the binary version of the sums)."""
        return self._matrix(np.ones(len(self.starts)))

    def share(self, vals: np.ndarray) -> sp.csr_matrix:
        """The float32 sums, each divided by its row's total (float64 per row, then float32)."""
        data = self.total(vals).astype(np.float32)
        if len(data) == 0:
            return self._matrix(data)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        row_total = np.bincount(rows, weights=data, minlength=self.shape[0])
        row_total[row_total == 0] = 1.0
        return self._matrix((data / row_total[rows]).astype(np.float32))


def _matrix_sum(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]
) -> sp.csr_matrix:
    """Sparse matrix from triplets, duplicates summed in float64 in input order, then float32.

    Why not scipy's duplicate summation: the sum must not depend on the other rows, so that
    one person's rows built from their own history equal their rows of the full snapshot bit
    for bit (the online/offline parity test holds that to 1e-9).
    """
    return _Pairs.of(rows, cols, shape).sum(vals)


def _matrix_max(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]
) -> sp.csr_matrix:
    """Sparse matrix from triplets, duplicates max-reduced."""
    return _Pairs.of(rows, cols, shape).max(vals)


def _cosine_neighbours(x: sp.csr_matrix, top: int) -> sp.csr_matrix:
    """Item-item cosine on a binary users × items matrix, keeping the `top` best per item."""
    b = _binary(x)
    co = (b.T @ b).tocsr().astype(np.float32)
    co.setdiag(0)
    co.eliminate_zeros()
    norm = np.sqrt(np.asarray(b.sum(axis=0)).ravel()).astype(np.float32)
    norm[norm == 0] = 1.0
    co = sp.csr_matrix(sp.diags(1.0 / norm) @ co @ sp.diags(1.0 / norm))
    return _keep_top_per_row(co, top)


def ease_neighbours(
    x: sp.csr_matrix, lam: float = EASE_LAMBDA, top: int = EASE_NEIGHBOURS, max_items: int = EASE_MAX_ITEMS
) -> sp.csr_matrix:
    """EASE (Steck 2019) weights B = -P / diag(P), P = (XᵀX + λI)⁻¹, on binary purchases.

    Why EASE next to cosine: it learns which co-purchases explain a purchase beyond
    popularity, the strongest single item-item signal on retail baskets. Only the `max_items`
    most bought items take part (the inverse is cubic), and only the `top` largest positive
    weights per item are kept, so a person's score is one sparse row product.
    """
    b = _binary(x)
    n_items = b.shape[1]
    buyers = np.asarray(b.sum(axis=0)).ravel()
    keep = np.flatnonzero(buyers > 0)
    if len(keep) > max_items:
        keep = keep[np.argsort(-buyers[keep], kind="stable")[:max_items]]
    if len(keep) < 2:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    sub = b[:, keep]
    gram = np.asarray((sub.T @ sub).toarray(), dtype=np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    w = -p / np.diag(p)[None, :]
    np.fill_diagonal(w, 0.0)
    w[w < 0] = 0.0
    pruned = _keep_top_per_row(sp.csr_matrix(w.astype(np.float32)), top).tocoo()
    return sp.csr_matrix((pruned.data, (keep[pruned.row], keep[pruned.col])), shape=(n_items, n_items))


def _keep_top_per_row(m: sp.csr_matrix, top: int) -> sp.csr_matrix:
    """Drop all but the `top` largest values of every row (vectorised by ranking within rows)."""
    m = m.tocoo()
    if m.nnz == 0:
        return m.tocsr()
    order = np.lexsort((-m.data, m.row))
    rows, cols, vals = m.row[order], m.col[order], m.data[order]
    starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    keep = rank < top
    return sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=m.shape)


def _distinct_buyers(p: pd.DataFrame, days: float, n_items: int) -> np.ndarray:
    recent = p[p["age"] < days]
    counts = recent.drop_duplicates(["u", "i"])["i"].value_counts()
    out = np.zeros(n_items, dtype=np.float64)
    out[counts.index.to_numpy()] = counts.to_numpy()
    return out


@dataclass(frozen=True)
class _Events:
    """A history restricted to catalogue items and strictly before `t_us`, in canonical order."""

    users: pd.Index
    u: np.ndarray
    i: np.ndarray
    kind: np.ndarray  # event type names
    age: np.ndarray  # days before the snapshot
    qty: np.ndarray
    decay: np.ndarray


def _events(
    hist: History,
    items: pd.Index,
    t_us: int,
    half_life_days: float,
    lookup: dict[str, int] | None = None,
) -> _Events:
    """Canonical order (person, time, type, item, quantity): a person's events come in the same
    order whether they are read from the whole table or from their own history row.

    `lookup` (item id -> position in `items`) replaces pandas' indexer for a short history."""
    if not len(hist):
        cols = np.empty(0, np.int64)
    elif lookup is not None:
        cols = np.fromiter((lookup.get(x, -1) for x in hist.item_id), np.int64, len(hist))
    else:
        cols = items.get_indexer(pd.Index(hist.item_id))
    keep = (hist.ts_us < t_us) & (cols >= 0)
    h = hist.take(keep)
    cols = cols[keep].astype(np.int64)
    if len(h) == 0:
        users, u = pd.Index([], dtype=object), np.empty(0, np.int64)
    elif (h.user_id == h.user_id[0]).all():  # one person's history row: no hashing needed
        users, u = pd.Index([str(h.user_id[0])], dtype=object), np.zeros(len(h), np.int64)
    else:
        users = pd.Index(np.unique(h.user_id.astype(str)))
        u = users.get_indexer(pd.Index(h.user_id)).astype(np.int64)
    kind = h.event_type.astype(str)
    code = np.full(len(kind), len(EVENT_CODES), dtype=np.int64)
    for name, c in EVENT_CODES.items():
        code[kind == name] = c
    order = np.lexsort((h.quantity, cols, code, h.ts_us, u))
    age = (t_us - h.ts_us[order]) / float(US_PER_DAY)
    return _Events(
        users=users,
        u=u[order],
        i=cols[order],
        kind=kind[order],
        age=age,
        qty=h.quantity[order],
        decay=np.exp(-np.log(2.0) * age / half_life_days),
    )


def user_side(
    hist: History,
    cat: Catalogue,
    as_of: pd.Timestamp | str,
    *,
    _ev: _Events | None = None,
) -> UserSide:
    """The persons' rows as of `as_of` from their interactions with the catalogue's items.

    The one computation of everything personal: `build_state` runs it over the whole event
    table, the online path over one person's history row read from Feast.
    """
    t_us = ts_to_us(as_of)
    lookup = (
        None if _ev is not None or len(hist) > _DICT_LOOKUP_MAX else _item_positions(cat.derived, cat.items)
    )
    ev = _ev if _ev is not None else _events(hist, cat.items, t_us, cat.half_life_days, lookup)
    n_u, n_i = len(ev.users), len(cat.items)
    shape = (n_u, n_i)
    p = ev.kind == "purchase"
    v = ev.kind == "view"
    lc = (ev.kind == "like") | (ev.kind == "add_to_cart")
    bought = _Pairs.of(ev.u[p], ev.i[p], shape)  # every purchase matrix has these entries
    buys = bought.sum(np.ones(int(p.sum())))
    last_buy = bought.max(1.0 / (1.0 + ev.age[p]))
    last_buy.data = (1.0 / last_buy.data).astype(np.float32)  # 1 + days since the latest purchase
    viewed = _Pairs.of(ev.u[v], ev.i[v], shape)
    w = np.ones(len(ev.kind))
    for kind, weight in EVENT_WEIGHT.items():
        w[ev.kind == kind] = weight
    w *= ev.decay
    return UserSide(
        users=ev.users,
        user_stats=_user_stats(ev, cat.item_stats["item_log_price"], n_u),
        buys=buys,
        bought=bought.ones(),
        qty=bought.sum(ev.qty[p]),
        buys_decay=bought.sum(ev.decay[p]),
        last_buy=last_buy,
        first_buy=bought.max(ev.age[p] + 1.0),
        views=viewed.sum(np.ones(int(v.sum()))),
        views_decay=viewed.sum(ev.decay[v]),
        liked=_matrix_max(ev.u[lc], ev.i[lc], np.ones(int(lc.sum())), shape),
        style_aff=_Pairs.of(ev.u, cat.item_style[ev.i], (n_u, len(cat.styles))).share(w),
        creator_aff=_Pairs.of(ev.u, cat.item_creator[ev.i], (n_u, len(cat.creators))).share(w),
    )


_DICT_LOOKUP_MAX = 2048  # events up to which a dict beats pandas' hashing of a new Index


def _item_positions(derived: dict[str, Any], items: pd.Index) -> dict[str, int]:
    """item id -> column, built once per catalogue (kept with its lazily built lookups)."""
    hit = derived.get("item_positions")
    if hit is None or hit[0] is not items:
        hit = derived["item_positions"] = (items, {str(x): k for k, x in enumerate(items)})
    positions: dict[str, int] = hit[1]
    return positions


def person_state(
    cat: Catalogue, user_id: str, history: History | None, as_of: pd.Timestamp | str
) -> RecState:
    """The state one request needs: the shared catalogue plus this person's rows as of `as_of`.

    What serving builds from the person's Feast history row; equal, row for row, to the
    person's rows of `build_state(events, as_of, catalogue=cat)`.
    """
    t0 = _as_utc(as_of)
    if history is None or len(history) == 0:  # nobody: the same empty rows at any time
        return RecState.assemble(cat, _no_person(cat), t0)
    return RecState.assemble(cat, user_side(history, cat, t0), t0)


def _no_person(cat: Catalogue) -> UserSide:
    """The persons' side without any person (built once per catalogue, shared read-only)."""
    hit = cat.derived.get("no_person")
    if hit is None:
        hit = cat.derived["no_person"] = user_side(History.of_person("", [], [], [], []), cat, cat.as_of)
    side: UserSide = hit
    return side


def build_catalogue(
    events: RecEvents, as_of: pd.Timestamp | str, half_life_days: float = HALF_LIFE_DAYS
) -> Catalogue:
    """The item side of `build_state` alone (what the feature build writes as an artifact)."""
    return build_state(events, as_of, half_life_days).catalogue()


def build_state(
    events: RecEvents,
    as_of: pd.Timestamp | str,
    half_life_days: float = HALF_LIFE_DAYS,
    *,
    catalogue: Catalogue | None = None,
) -> RecState:
    """Snapshot of everything known strictly before `as_of` (point-in-time correct).

    With `catalogue`, the item side (items, item statistics, graphs) is that artifact and
    only the persons' side is computed as of `as_of`: the offline equivalent of serving, which
    reads fresh person rows against the catalogue of the last feature build.
    """
    t0 = _as_utc(as_of)
    t_us = ts_to_us(t0)
    hist = History.from_frame(events.interactions)
    if catalogue is not None:
        return RecState.assemble(catalogue, user_side(hist, catalogue, t0), t0)

    items_df = events.items.assign(created_time=_utc_series(events.items["created_time"]))
    before = hist.ts_us < t_us
    seen_items = set(np.unique(hist.item_id[before]).tolist())
    items_df = items_df[(items_df["created_time"] < t0) | items_df["item_id"].astype(str).isin(seen_items)]
    items_df = items_df.drop_duplicates("item_id").reset_index(drop=True)
    items = pd.Index(items_df["item_id"].astype(str))
    creator_codes, creators = pd.factorize(items_df["creator_id"].astype(str))
    style_codes, styles = pd.factorize(items_df["style"].astype(str))
    ev = _events(hist, items, t_us, half_life_days)
    if len(ev.u) == 0:
        raise RecDataError(f"no interactions before {t0:%Y-%m-%d}: nothing to recommend from")
    n_i = len(items)
    frame = pd.DataFrame({"u": ev.u, "i": ev.i, "age": ev.age})
    p = frame[ev.kind == "purchase"]
    v = frame[ev.kind == "view"]

    created_days = _days_before(items_df["created_time"], t0)
    first_sale = p.groupby("i")["age"].max()
    listed = created_days.copy()
    listed[first_sale.index.to_numpy()] = np.maximum(
        listed[first_sale.index.to_numpy()], first_sale.to_numpy()
    )
    item_stats = _item_stats(p, v, items_df, style_codes, listed, n_i)
    owner: dict[str, np.ndarray] = {}
    if events.creators is not None and "user_id" in events.creators:
        own = events.creators.dropna(subset=["user_id"])
        codes = pd.Index(creators.astype(str)).get_indexer(pd.Index(own["creator_id"].astype(str)))
        keep = codes >= 0
        grouped = pd.Series(codes[keep]).groupby(own["user_id"].astype(str).to_numpy()[keep])
        owner = {str(k): g.to_numpy() for k, g in grouped}
    cat = Catalogue(
        as_of=t0,
        items=items,
        item_creator=creator_codes.astype(np.int64),
        creators=pd.Index(creators.astype(str)),
        item_style=style_codes.astype(np.int64),
        styles=pd.Index(styles.astype(str)),
        item_active=(items_df["status"].astype(str) == "active").to_numpy(),
        item_created_days=listed,
        item_stats=item_stats,
        copurchase=sp.csr_matrix((n_i, n_i), dtype=np.float32),
        coview=sp.csr_matrix((n_i, n_i), dtype=np.float32),
        ease=sp.csr_matrix((n_i, n_i), dtype=np.float32),
        creator_owner=owner,
        half_life_days=half_life_days,
    )
    people = user_side(hist, cat, t0, _ev=ev)
    browse = people.views + people.liked
    cat.copurchase = _cosine_neighbours(people.buys, NEIGHBOURS)
    cat.coview = (
        _cosine_neighbours(browse, NEIGHBOURS) if browse.nnz else sp.csr_matrix((n_i, n_i), dtype=np.float32)
    )
    cat.ease = ease_neighbours(people.buys)
    return RecState.assemble(cat, people, t0)


def _item_stats(
    p: pd.DataFrame, v: pd.DataFrame, items_df: pd.DataFrame, style: np.ndarray, listed: np.ndarray, n_i: int
) -> dict[str, np.ndarray]:
    pop_1d = _distinct_buyers(p, 1, n_i)
    pop_7d = _distinct_buyers(p, 7, n_i)
    pop_30d = _distinct_buyers(p, 30, n_i)
    pop_all = _distinct_buyers(p, np.inf, n_i)
    first = p.groupby(["u", "i"])["age"].max()
    first_30 = first[first < 30].index.get_level_values("i").to_numpy()
    new_buyers_30d = np.bincount(first_30, minlength=n_i).astype(np.float64)
    per_pair = p.groupby(["u", "i"]).size()
    repeaters = (per_pair > 1).groupby(level="i").mean()
    repeat_share = np.full(n_i, np.nan)
    repeat_share[repeaters.index.to_numpy()] = repeaters.to_numpy()
    # median gap between consecutive purchases of one item by one person
    srt = p.sort_values(["u", "i", "age"], ascending=[True, True, False])
    same = (srt["u"].to_numpy()[1:] == srt["u"].to_numpy()[:-1]) & (
        srt["i"].to_numpy()[1:] == srt["i"].to_numpy()[:-1]
    )
    gaps = srt["age"].to_numpy()[:-1] - srt["age"].to_numpy()[1:]
    gap_frame = pd.DataFrame({"i": srt["i"].to_numpy()[1:][same], "gap": gaps[same]})
    gap_frame = gap_frame[gap_frame["gap"] > 0.5]
    med_gap = gap_frame.groupby("i")["gap"].median()
    rebuy_gap = np.full(n_i, np.nan)
    rebuy_gap[med_gap.index.to_numpy()] = med_gap.to_numpy()
    views_7d = np.bincount(v.loc[v["age"] < 7, "i"].to_numpy(), minlength=n_i).astype(np.float64)
    week = p[p["age"] < 7].drop_duplicates(["u", "i"])
    style_week = np.bincount(style[week["i"].to_numpy()], minlength=int(style.max()) + 1).astype(np.float64)
    style_share = style_week[style] / max(float(style_week.sum()), 1.0)
    price = items_df["price"].to_numpy(np.float64)
    return {
        "item_pop_1d": pop_1d,
        "item_pop_7d": pop_7d,
        "item_pop_30d": pop_30d,
        "item_pop_all": pop_all,
        "item_new_buyers_30d": new_buyers_30d,
        "item_trend": (pop_7d + 1.0) / (pop_30d * 7.0 / 30.0 + 1.0),
        "item_views_7d": views_7d,
        "item_age_days": listed,
        "item_log_price": np.log1p(np.maximum(price, 0.0)),
        "item_repeat_share": repeat_share,
        "item_rebuy_gap_days": rebuy_gap,
        "item_style_pop_7d": style_share,
    }


def _per_user_min(u: np.ndarray, x: np.ndarray, n_u: int) -> np.ndarray:
    out = np.full(n_u, np.inf)
    np.minimum.at(out, u, x)
    out[np.isinf(out)] = np.nan
    return out


def _per_user_max(u: np.ndarray, x: np.ndarray, n_u: int) -> np.ndarray:
    out = np.full(n_u, -np.inf)
    np.maximum.at(out, u, x)
    out[np.isinf(out)] = np.nan
    return out


def _per_user_median(u: np.ndarray, x: np.ndarray, n_u: int) -> np.ndarray:
    """Median per user, (a + b) / 2 of the middle pair: the same arithmetic for one or many users."""
    out = np.full(n_u, np.nan)
    if len(u) == 0:
        return out
    order = np.lexsort((x, u))
    us, xs = u[order], x[order]
    counts = np.bincount(us, minlength=n_u)
    has = np.flatnonzero(counts)
    starts = (np.cumsum(counts) - counts)[has]
    c = counts[has]
    out[has] = (xs[starts + (c - 1) // 2] + xs[starts + c // 2]) / 2.0
    return out


def _user_stats(ev: _Events, log_price: np.ndarray, n_u: int) -> dict[str, np.ndarray]:
    p = ev.kind == "purchase"
    v = ev.kind == "view"
    pu, pi = ev.u[p], ev.i[p]
    n_purchases = np.bincount(pu, minlength=n_u).astype(np.float64)
    pairs = np.unique(pu * np.int64(max(len(log_price), 1)) + pi)
    n_items = np.bincount(pairs // max(len(log_price), 1), minlength=n_u).astype(np.float64)
    views_30d = np.bincount(ev.u[v & (ev.age < 30)], minlength=n_u).astype(np.float64)
    return {
        "user_n_purchases": n_purchases,
        "user_n_items": n_items,
        "user_repeat_share": np.where(n_purchases > 0, 1.0 - n_items / np.maximum(n_purchases, 1.0), np.nan),
        "user_days_since_purchase": _per_user_min(pu, ev.age[p], n_u),
        "user_days_since_first": _per_user_max(pu, ev.age[p], n_u),
        "user_price_band": _per_user_median(pu, log_price[pi], n_u),
        "user_n_views_30d": views_30d,
        "user_days_since_view": _per_user_min(ev.u[v], ev.age[v], n_u),
    }


# --------------------------------------------------------------------------------------------
# (user, item, context) -> model matrix.


def row_dense(m: sp.csr_matrix, r: int) -> np.ndarray:
    """Row `r` of a CSR matrix as a dense vector, straight from its arrays.

    Why not `m[r].toarray()`: scipy's indexing costs tens of microseconds per call, and one
    request reads a dozen rows; this is a slice and a bincount.
    """
    s, e = m.indptr[r], m.indptr[r + 1]
    return np.bincount(m.indices[s:e], weights=m.data[s:e], minlength=m.shape[1]).astype(np.float64)


def row_graph(m: sp.csr_matrix, r: int, graph: sp.csr_matrix) -> np.ndarray:
    """(m[r] @ graph) as a dense vector: the rows of `graph` for the person's items, weighted."""
    s, e = m.indptr[r], m.indptr[r + 1]
    js, ws = m.indices[s:e], m.data[s:e]
    starts, lens = graph.indptr[js], graph.indptr[js + 1] - graph.indptr[js]
    total = int(lens.sum())
    if total == 0:
        return np.zeros(graph.shape[1])
    offsets = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total)  # exclusive cumsum
    weights = graph.data[offsets] * np.repeat(ws, lens)
    return np.bincount(graph.indices[offsets], weights=weights, minlength=graph.shape[1])


def row_entries(m: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in `rows`, column) of every stored entry of m[rows], without scipy indexing."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, lens = m.indptr[rows], m.indptr[rows + 1] - m.indptr[rows]
    total = int(lens.sum())
    offsets = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total)  # exclusive cumsum
    return np.repeat(np.arange(len(rows)), lens), m.indices[offsets].astype(np.int64)


def rows_dense(m: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """m[rows] as a dense (len(rows) × columns) array; fast path for one row."""
    if len(rows) == 1:
        return row_dense(m, int(rows[0]))[None, :]
    return np.asarray(m[rows].toarray(), dtype=np.float64)


def rows_graph(state: RecState, user_key: str, graph_key: str, rows: np.ndarray) -> np.ndarray:
    """(state.<user_key>[rows] @ state.<graph_key>) dense; memoised fast path for one row."""
    if len(rows) == 1:
        return state.user_graph(user_key, graph_key, int(rows[0]))[None, :]
    m, graph = getattr(state, user_key), getattr(state, graph_key)
    return np.asarray((m[rows] @ graph).toarray(), dtype=np.float64)


def _single(rows: np.ndarray) -> int | None:
    """The one person of a request block, or None if several appear."""
    return int(rows[0]) if len(rows) and rows[0] == rows[-1] and (rows == rows[0]).all() else None


def _pair_values(m: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """m[rows[k], cols[k]] for every k; rows of -1 (unknown person) give 0."""
    out = np.zeros(len(rows), dtype=np.float64)
    ok = (rows >= 0) & (cols >= 0)
    if not ok.any():
        return out
    r, c = rows[ok], cols[ok]
    one = _single(r)
    out[ok] = row_dense(m, one)[c] if one is not None else np.asarray(m[r, c]).ravel()
    return out


def _user_graph_scores(
    state: RecState, user_key: str, graph_key: str, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """(user matrix @ item graph)[rows, cols], computed only for the persons that appear."""
    out = np.zeros(len(rows), dtype=np.float64)
    ok = rows >= 0
    if not ok.any():
        return out
    one = _single(rows[ok])
    if one is not None:
        out[ok] = state.user_graph(user_key, graph_key, one)[cols[ok]]
        return out
    uniq, pos = np.unique(rows[ok], return_inverse=True)
    prod = (getattr(state, user_key)[uniq] @ getattr(state, graph_key)).tocsr()
    out[ok] = np.asarray(prod[pos, cols[ok]]).ravel()
    return out


def pair_features(
    state: RecState,
    rows: np.ndarray,
    cols: np.ndarray,
    context: np.ndarray | None = None,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """Model matrix (n × len(names)) for users `rows`, candidate items `cols` and context items.

    `rows` are positions in `state.users` (-1 = unknown person), `cols` positions in
    `state.items`, `context` the item on screen per row (-1 = none). Missing values are NaN.
    Every value depends on its own (person, item, context) only, never on the other rows, so
    the input of one returned item can be rebuilt exactly for the decision log.
    """
    names = list(names or [f.name for f in REC_FEATURES])
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    n = len(rows)
    ctx = np.full(n, -1, dtype=np.int64) if context is None else np.asarray(context, dtype=np.int64)
    known = rows >= 0
    out = np.full((n, len(names)), np.nan, dtype=np.float32)
    cache: dict[str, np.ndarray] = {}

    def ui(key: str) -> np.ndarray:
        if key not in cache:
            m = getattr(state, key)
            cache[key] = _pair_values(m, rows, cols)
        return cache[key]

    def graph(user_key: str, graph_key: str) -> np.ndarray:
        key = f"{user_key}@{graph_key}"
        if key not in cache:
            cache[key] = _user_graph_scores(state, user_key, graph_key, rows, cols)
        return cache[key]

    def user(key: str) -> np.ndarray:
        vals = np.full(n, np.nan)
        vals[known] = state.user_stats[key][rows[known]]
        return vals

    def days(key: str) -> np.ndarray:
        raw = ui(key)
        return np.where(raw > 0, raw - 1.0, np.nan)

    for j, name in enumerate(names):
        if name.startswith("item_"):
            col = state.item_stats[name][cols]
        elif name.startswith("user_"):
            col = user(name)
        elif name == "ui_n_purchases":
            col = np.where(known, ui("buys"), np.nan)
        elif name == "ui_quantity":
            col = np.where(known, ui("qty"), np.nan)
        elif name == "ui_decay_purchases":
            col = np.where(known, ui("buys_decay"), np.nan)
        elif name == "ui_days_since_purchase":
            col = days("last_buy")
        elif name == "ui_days_since_first":
            col = days("first_buy")
        elif name == "ui_rebuy_due":
            col = days("last_buy") / state.item_stats["item_rebuy_gap_days"][cols]
        elif name == "ui_n_views":
            col = np.where(known, ui("views"), np.nan)
        elif name == "ui_liked_or_carted":
            col = np.where(known, ui("liked"), np.nan)
        elif name == "ui_copurchase":
            col = np.where(known, graph("buys_decay", "copurchase"), np.nan)
        elif name == "ui_copurchase_mean":
            binary = graph("bought", "copurchase")
            col = np.where(known, binary / np.maximum(user("user_n_items"), 1.0), np.nan)
        elif name == "ui_ease":
            col = np.where(known, graph("bought", "ease"), np.nan)
        elif name == "ui_ease_decay":
            col = np.where(known, graph("buys_decay", "ease"), np.nan)
        elif name == "ui_ease_rel":
            best = _user_graph_max(state, "bought", "ease", rows)
            col = np.where(known, graph("bought", "ease") / np.maximum(best, 1e-9), np.nan)
        elif name == "ui_coview":
            col = np.where(known, graph("views_decay", "coview"), np.nan)
        elif name == "ui_style_affinity":
            col = np.where(known, _pair_values(state.style_aff, rows, state.item_style[cols]), np.nan)
        elif name == "ui_creator_affinity":
            col = np.where(known, _pair_values(state.creator_aff, rows, state.item_creator[cols]), np.nan)
        elif name == "ui_price_gap":
            col = state.item_stats["item_log_price"][cols] - user("user_price_band")
        elif name.startswith("ctx_"):
            col = _context_feature(state, name, ctx, cols)
        else:
            raise KeyError(f"no computation for feature {name!r}")
        out[:, j] = col
    return out


def _user_graph_max(state: RecState, user_key: str, graph_key: str, rows: np.ndarray) -> np.ndarray:
    """Per row, the person's largest (user matrix @ item graph) score over all items."""
    out = np.zeros(len(rows), dtype=np.float64)
    ok = rows >= 0
    if not ok.any():
        return out
    one = _single(rows[ok])
    if one is not None:
        out[ok] = state.user_graph(user_key, graph_key, one).max()
        return out
    uniq, pos = np.unique(rows[ok], return_inverse=True)
    prod = (getattr(state, user_key)[uniq] @ getattr(state, graph_key)).tocsr()
    out[ok] = np.asarray(prod.max(axis=1).toarray()).ravel()[pos]
    return out


def _binary(m: sp.csr_matrix) -> sp.csr_matrix:
    b = m.copy()
    b.data[:] = 1.0
    return b


def _context_feature(state: RecState, name: str, ctx: np.ndarray, cols: np.ndarray) -> np.ndarray:
    has = ctx >= 0
    out = np.full(len(cols), np.nan)
    if not has.any():
        return out
    c, i = ctx[has], cols[has]
    if name == "ctx_copurchase":
        out[has] = _pair_values(state.copurchase, c, i)
    elif name == "ctx_coview":
        out[has] = _pair_values(state.coview, c, i)
    elif name == "ctx_same_style":
        out[has] = (state.item_style[c] == state.item_style[i]).astype(np.float64)
    elif name == "ctx_same_creator":
        out[has] = (state.item_creator[c] == state.item_creator[i]).astype(np.float64)
    elif name == "ctx_price_gap":
        price = state.item_stats["item_log_price"]
        out[has] = price[i] - price[c]
    else:
        raise KeyError(f"no computation for feature {name!r}")
    return out
