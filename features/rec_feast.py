"""The recommender's Feast feature set: stored views, on-demand views, the online history.

What lives where, and why (one definition list, `REC_FEATURES`, generates all of it):

* ``recommender_item`` (FeatureView, entity item): the ``item_*`` features as of the feature
  build, materialised. Batch features: popularity windows over every buyer.
* ``recommender_user_history`` (FeatureView, entity user): a person's interactions as parallel
  arrays (ids, items, types, microsecond times, quantities). Not a model input itself: the
  exact, compact form every personal feature is computed from at request time, so
  ``user_days_since_purchase`` or a decayed affinity is as of the request, not of the build.
  Materialised by the build, then appended to by `RecHistoryStore.append` on every
  interaction the API receives (POST /v1/events): a purchase shows up in the next request.
* ``recommender_user_item`` (on-demand view over the history and the request): ``user_*``
  and ``ui_*`` features; ``recommender_request`` (on-demand view over the request): ``ctx_*``.
  Both run `features.rec_features.pair_features`, the function the training sets use.
* The item-item graphs (co-purchase, co-view, EASE: whole-catalogue structures rebuilt with
  an EASE inversion) stay a model-side artifact, the `Catalogue` written next to the
  offline tables (``recommender_catalogue.pkl``); the on-demand views read it.

FeatureServices ``recommender_personalized`` and ``recommender_limited`` are generated per
tier; the limited one holds no feature with a personal category, so it never reads the history
view. Serving reads the same rows without Feast's per-call overhead (`RecHistoryStore.read`)
and calls the same functions (`person_state`, `pair_features`).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from features.definitions import FeatureDef
from features.feature_repo import (
    TIMESTAMP,
    FeatureSet,
    OnDemand,
    ProfileView,
    offline_table_path,
)
from features.rec_features import (
    REC_FEATURES,
    Catalogue,
    History,
    RecEvents,
    build_state,
    pair_features,
    person_state,
    ts_to_us,
)

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger("aipic.features.recommender")

MODEL = "recommender"
ITEM_VIEW = f"{MODEL}_item"
HISTORY_VIEW = f"{MODEL}_user_history"
CATALOGUE_FILE = f"{MODEL}_catalogue.pkl"
#: Request-time inputs of the on-demand views (the candidate, the picture on screen, the time).
ITEM_INPUT, CONTEXT_INPUT, TIME_INPUT = "rec_item_id", "rec_context_item_id", "rec_request_ts_us"
HISTORY_FIELDS: dict[str, str] = {
    "hist_event_ids": "Array(String)",
    "hist_item_ids": "Array(String)",
    "hist_event_types": "Array(String)",
    "hist_ts_us": "Array(Int64)",
    "hist_quantity": "Array(Float64)",
}
#: Entities whose features the on-demand views compute (the rest are stored).
PERSONAL_ENTITIES = frozenset({"user", "user_item"})


def _names(entities: frozenset[str]) -> list[str]:
    return [f.name for f in REC_FEATURES if f.entity in entities]


# --- the model-side artifact ------------------------------------------------------------------------


def catalogue_path(offline_dir: Path) -> Path:
    return Path(offline_dir) / CATALOGUE_FILE


_CATALOGUE_CACHE: dict[Path, tuple[float, Catalogue]] = {}
_CACHE_LOCK = threading.Lock()


def load_catalogue(offline_dir: Path) -> Catalogue:
    """The catalogue of the last build (cached per file version)."""
    path = catalogue_path(offline_dir).resolve()
    mtime = path.stat().st_mtime if path.exists() else -1.0
    with _CACHE_LOCK:
        hit = _CATALOGUE_CACHE.get(path)
        if hit is not None and hit[0] == mtime:
            return hit[1]
    cat = Catalogue.load(path)
    with _CACHE_LOCK:
        _CATALOGUE_CACHE[path] = (mtime, cat)
    return cat


def _current_catalogue() -> Catalogue | None:
    """The catalogue of the configured feature repo, None before the first build."""
    from features.settings import get_settings
    from features.store import offline_dir

    path = catalogue_path(offline_dir(get_settings()))
    return load_catalogue(path.parent) if path.exists() else None


# --- the on-demand views -------------------------------------------------------------------------


def _ids(series: pd.Series | None, n: int) -> np.ndarray:
    if series is None:
        return np.full(n, None, dtype=object)
    return np.asarray(
        [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in series]
    )


def _empty_state(cat: Catalogue) -> Any:
    return person_state(cat, "", None, cat.as_of)


def context_features(inputs: pd.DataFrame) -> pd.DataFrame:
    """The on-demand view ``recommender_request`` (self-contained: Feast rebuilds it from source)."""
    from features.rec_feast import compute_context_features

    return compute_context_features(inputs)


def personal_features(inputs: pd.DataFrame) -> pd.DataFrame:
    """The on-demand view ``recommender_user_item`` (self-contained: Feast rebuilds it from source)."""
    from features.rec_feast import compute_personal_features

    return compute_personal_features(inputs)


def compute_context_features(inputs: pd.DataFrame) -> pd.DataFrame:
    """``ctx_*`` of (candidate, picture on screen) rows: no person involved.

    Unknown items (or no catalogue yet) give NaN, as an item outside the snapshot has no
    features; Feast calls this with made-up ids when it registers the view.
    """
    names = _names(frozenset({"request"}))
    n = len(inputs)
    out = np.full((n, len(names)), np.nan)
    cat = _current_catalogue()
    if cat is not None and n:
        cols = cat.items.get_indexer(pd.Index(_ids(inputs.get(ITEM_INPUT), n)))
        ctx = cat.items.get_indexer(pd.Index(_ids(inputs.get(CONTEXT_INPUT), n)))
        ok = cols >= 0
        if ok.any():
            rows = np.full(int(ok.sum()), -1)
            out[ok] = pair_features(_empty_state(cat), rows, cols[ok], ctx[ok], names)
    return pd.DataFrame(out, columns=names)


def compute_personal_features(inputs: pd.DataFrame) -> pd.DataFrame:
    """``user_*`` and ``ui_*`` of (person, candidate, request time) rows from the history view.

    The rows of one person and request time share one `person_state`, exactly what serving
    builds for a request.
    """
    names = _names(PERSONAL_ENTITIES)
    n = len(inputs)
    out = np.full((n, len(names)), np.nan)
    cat = _current_catalogue()
    if cat is None or n == 0:
        return pd.DataFrame(out, columns=names)
    users = _ids(inputs.get("user_id"), n)
    times = inputs[TIME_INPUT].to_numpy() if TIME_INPUT in inputs else np.zeros(n)
    cols = cat.items.get_indexer(pd.Index(_ids(inputs.get(ITEM_INPUT), n)))
    groups: dict[tuple[str, int], list[int]] = {}
    for k in range(n):
        if users[k] is not None and cols[k] >= 0:
            groups.setdefault((str(users[k]), int(times[k])), []).append(k)
    for (uid, ts), idx in groups.items():
        first = inputs.iloc[idx[0]]
        hist = _history_of(uid, {f: first.get(f) for f in HISTORY_FIELDS})
        when = pd.Timestamp(ts, unit="us", tz="UTC")
        state = person_state(cat, uid, hist, when)
        row = state.user_row(uid)
        pos = np.asarray(idx)
        out[pos] = pair_features(state, np.full(len(pos), row), cols[pos], None, names)
    return pd.DataFrame(out, columns=names)


def _history_of(user_id: str, row: Mapping[str, Any] | None) -> History | None:
    """A Feast history row (arrays or lists) as a `History`; None if the person has none."""
    if not row:
        return None

    def seq(name: str) -> list[Any]:
        v = row.get(name)
        return [] if v is None or (isinstance(v, float) and np.isnan(v)) else list(v)

    items = seq("hist_item_ids")
    if not items:
        return None
    return History.of_person(user_id, items, seq("hist_event_types"), seq("hist_ts_us"), seq("hist_quantity"))


# --- the offline build ---------------------------------------------------------------------------


def history_frame(inter: pd.DataFrame, event_ids: pd.Series | None = None) -> pd.DataFrame:
    """One row per person: their interactions as arrays, in time order (the Feast history rows)."""
    hist = History.from_frame(inter)
    ids = (
        event_ids.astype(str).to_numpy(dtype=object)
        if event_ids is not None
        else np.asarray([f"row-{k}" for k in range(len(inter))], dtype=object)
    )
    frame = pd.DataFrame(
        {
            "user_id": hist.user_id,
            "hist_event_ids": ids,
            "hist_item_ids": hist.item_id,
            "hist_event_types": hist.event_type,
            "hist_ts_us": hist.ts_us,
            "hist_quantity": hist.quantity,
        }
    ).sort_values(["user_id", "hist_ts_us"], kind="stable")
    return frame.groupby("user_id", sort=True).agg(list).reset_index()


def build_tables(events_dir: Path, offline_dir: Path, as_of: pd.Timestamp | None = None) -> dict[str, Any]:
    """Catalogue artifact, ``recommender_item`` and ``recommender_user_history`` offline tables.

    `as_of` (default: just after the newest interaction) is the snapshot time of the item
    side; the histories hold every interaction before it.
    """
    from features.storage import read_table, table_path

    started = time.perf_counter()
    if not table_path(events_dir, "interactions").exists():
        return {"skipped": "no interactions table"}
    raw = read_table(events_dir, "interactions")
    events = RecEvents(
        raw[["user_id", "item_id", "event_type", "event_time", "quantity"]],
        read_table(
            events_dir, "items", ["item_id", "creator_id", "style", "price", "created_time", "status"]
        ),
        read_table(events_dir, "creators", ["creator_id", "user_id"])
        if table_path(events_dir, "creators").exists()
        else None,
    ).checked()
    times = pd.to_datetime(raw["event_time"], utc=True)
    when = pd.Timestamp(as_of) if as_of is not None else times.max() + pd.Timedelta(microseconds=1)
    when = when.tz_localize("UTC") if when.tzinfo is None else when.tz_convert("UTC")
    cat = build_state(events, when).catalogue()
    offline_dir.mkdir(parents=True, exist_ok=True)
    cat.save(catalogue_path(offline_dir))
    items = pd.DataFrame({"item_id": np.asarray(cat.items, dtype=object)})
    for f in REC_FEATURES:
        if f.entity == "item":
            items[f.name] = np.asarray(cat.item_stats[f.name], dtype=np.float64)
    items[TIMESTAMP] = when
    _write(items, offline_table_path(offline_dir, ITEM_VIEW))
    before = (times < when).to_numpy()
    hist = history_frame(raw[before], raw["event_id"][before] if "event_id" in raw else None)
    hist[TIMESTAMP] = when
    _write(hist, offline_table_path(offline_dir, HISTORY_VIEW))
    return {
        "as_of": when.isoformat(),
        "items": len(items),
        "persons": len(hist),
        "interactions": int(before.sum()),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _write(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def build_offline_tables(
    events_dir: Path, offline_dir: Path, on_step: Callable[[str, int, int], None] | None = None
) -> dict[str, Any]:
    """`FeatureSet.build_offline` of the recommender (run by `aipic features build`)."""
    if on_step:
        on_step("recommender catalogue and histories", 0, 1)
    return build_tables(Path(events_dir), Path(offline_dir))


# --- the online history --------------------------------------------------------------------------


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _event_us(value: Any) -> int:
    if isinstance(value, dt.datetime):
        t = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
    return ts_to_us(pd.Timestamp(value))


class RecHistoryStore:
    """Read and append persons' history rows in Feast's online store (SQLite or Redis).

    Appending is read-modify-write under a process lock and idempotent by event id (the same
    event twice changes nothing); the order of arrival does not matter, as every feature is
    computed from the events sorted canonically. Several API processes appending for the same
    person at the same instant could lose one append: the next feature build restores it.
    """

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._view: Any = None
        self._missing_logged = False

    def _fv(self) -> Any:
        if self._view is None:
            self._view = self.store.get_feature_view(HISTORY_VIEW)
        return self._view

    def _key(self, user_id: str) -> Any:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        return EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=user_id)])

    def read_row(self, user_id: str) -> dict[str, list[Any]] | None:
        """The person's stored arrays, or None."""
        rows = self.store._get_provider().online_read(
            config=self.store.config, table=self._fv(), entity_keys=[self._key(user_id)]
        )
        values = rows[0][1] if rows else None
        if not values:
            return None
        out: dict[str, list[Any]] = {}
        for name in HISTORY_FIELDS:
            v = values.get(name)
            kind = v.WhichOneof("val") if v is not None else None
            out[name] = list(getattr(v, kind).val) if kind else []
        return out if out["hist_item_ids"] else None

    def read(self, user_id: str) -> History | None:
        """The person's history as stored online (None: no interactions known)."""
        return _history_of(user_id, self.read_row(user_id))

    def _write_row(self, user_id: str, row: Mapping[str, Sequence[Any]], when: dt.datetime) -> None:
        from feast.protos.feast.types.Value_pb2 import DoubleList, Int64List, StringList, Value

        values = {
            "hist_event_ids": Value(string_list_val=StringList(val=[str(x) for x in row["hist_event_ids"]])),
            "hist_item_ids": Value(string_list_val=StringList(val=[str(x) for x in row["hist_item_ids"]])),
            "hist_event_types": Value(
                string_list_val=StringList(val=[str(x) for x in row["hist_event_types"]])
            ),
            "hist_ts_us": Value(int64_list_val=Int64List(val=[int(x) for x in row["hist_ts_us"]])),
            "hist_quantity": Value(double_list_val=DoubleList(val=[float(x) for x in row["hist_quantity"]])),
        }
        self.store._get_provider().online_write_batch(
            self.store.config, self._fv(), [(self._key(user_id), values, when, None)], progress=None
        )

    def append(self, events: Sequence[Any]) -> int:
        """Add interactions (mappings or `Interaction` events) to their persons' rows; returns
        how many were new. Skipped with a warning if the history view is not registered."""
        from feast.errors import FeatureViewNotFoundException

        if not events:
            return 0
        try:
            self._fv()
        except FeatureViewNotFoundException:
            if not self._missing_logged:
                log.warning("%s is not registered: interactions not kept for recommendations", HISTORY_VIEW)
                self._missing_logged = True
            return 0
        by_user: dict[str, list[Any]] = {}
        for e in events:
            by_user.setdefault(str(_get(e, "user_id")), []).append(e)
        added = 0
        with self._lock:
            for uid, evs in by_user.items():
                row = self.read_row(uid) or {name: [] for name in HISTORY_FIELDS}
                seen = set(row["hist_event_ids"])
                newest = max(row["hist_ts_us"], default=0)
                fresh = 0
                for e in evs:
                    eid = str(_get(e, "event_id"))
                    if eid in seen:
                        continue
                    seen.add(eid)
                    ts = _event_us(_get(e, "event_time"))
                    kind = _get(e, "event_type")
                    row["hist_event_ids"].append(eid)
                    row["hist_item_ids"].append(str(_get(e, "item_id")))
                    row["hist_event_types"].append(str(getattr(kind, "value", kind)))
                    row["hist_ts_us"].append(ts)
                    row["hist_quantity"].append(float(_get(e, "quantity") or 1))
                    newest = max(newest, ts)
                    fresh += 1
                if fresh:
                    added += fresh
                    when = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=newest)
                    self._write_row(uid, row, when)
        return added


_STORES: dict[int, RecHistoryStore] = {}


def history_store(store: FeatureStore) -> RecHistoryStore:
    """One `RecHistoryStore` per FeatureStore (its lock serialises that store's appends)."""
    with _CACHE_LOCK:
        hs = _STORES.get(id(store))
        if hs is None or hs.store is not store:
            hs = _STORES[id(store)] = RecHistoryStore(store)
        return hs


# --- the feature set -------------------------------------------------------------------------------


def _limited(f: FeatureDef) -> bool:
    """The limited tier: features without any personal data category."""
    return not f.categories


FEATURE_SET = FeatureSet(
    model=MODEL,
    features=tuple(REC_FEATURES),
    tiers={"personalized": lambda f: True, "limited": _limited},
    on_demand=(
        OnDemand(
            name="user_item",
            entities=PERSONAL_ENTITIES,
            inputs={ITEM_INPUT: "String", TIME_INPUT: "Int64"},
            fn=personal_features,
            sources=(HISTORY_VIEW,),
        ),
        OnDemand(
            name="request",
            entities=frozenset({"request"}),
            inputs={ITEM_INPUT: "String", CONTEXT_INPUT: "String"},
            fn=context_features,
        ),
    ),
    raw_views=(ProfileView(HISTORY_VIEW, "user", HISTORY_FIELDS),),
    build_offline=build_offline_tables,
)
