"""`aipic bench online-retail`: next-purchase recommendation on the UCI Online Retail data.

Protocol (`../shared/data/README.md`): lines with a CustomerID, not cancelled, Quantity > 0,
StockCode starting with a digit; train = invoices before `train_end`, test = [train_end,
test_end); persons who bought in both periods; k = 10; every item bought in the test period is
relevant; binary-relevance nDCG. Two columns: repeats allowed (every test item relevant), and
only items not bought before (lists exclude the person's past purchases, relevance = test items
not bought before; persons with no such item are left out of that column).

The aipic ranker goes through the project's pipeline: the importer writes the event tables,
`features.rec_features` builds point-in-time snapshots from them, and the ranker (one per
column: repeats allowed / not) learns from label windows that end by `train_end`: features
before 2011-05-02 with labels to 07-02, and before 07-02 with labels to 09-01. Its number of
trees is picked on the same set-up moved one window back, early-stopped on 07-02..09-01; the
test period is never seen in training or tuning. Its other settings (negative sampling, tree
size, candidate quotas, EASE λ of the feature) were chosen on a validation run of this very
procedure with train_end 2011-07-02 and test_end 2011-09-01.

The baselines are computed in the same run on the same training purchases: most popular
(distinct buyers), re-buy then popular (the person's items by number of purchases, ties and
the rest by popularity: stronger than the README's 0.292 row), EASE with the README's λ (200
for "all", 1000 for "new", which the README picked on the test period) and implicit ALS
(64 factors, regularisation 0.05, 15 iterations).
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.rec_features import History, RecEvents, RecState, build_state, person_state
from models import baselines as bl
from models.candidates import CandidateConfig
from models.ranker import LambdaRanker
from models.rec_metrics import ranking_metrics
from models.recommend import (
    BusinessRules,
    Recommender,
    RecRequest,
    TrainingSet,
    rank_batch,
    recommend,
    training_set,
)

DEFAULT_DATA = Path("../shared/data/online-retail/transactions.parquet")
K = 10
EASE_LAMBDA = {"all": 200.0, "new": 1000.0}  # the README's values (picked on its test period)
MODES = ("all", "new")

# Reference figures of the README (nDCG@10): context for the table, not the bar we compute.
PUBLISHED: dict[str, dict[str, float | None]] = {
    "most_popular": {"all": 0.106, "new": 0.043},
    "rebuy_then_popular": {"all": 0.292, "new": None},
    "ease": {"all": 0.283, "new": 0.111},
    "als": {"all": 0.289, "new": 0.103},
}


class BenchError(ValueError):
    """The benchmark cannot run as asked; the message says why (shown without a stack trace)."""


@dataclass(frozen=True)
class BenchConfig:
    data: Path = DEFAULT_DATA
    train_end: str = "2011-09-01"
    test_end: str = "2011-11-01"
    k: int = K
    training_windows: int = 2  # label windows before train_end used to fit the final ranker
    window_step_days: int | None = None  # days between their cutoffs (None = label length)
    max_users: int | None = None  # evaluate on a sample (tests); None = every eligible person
    n_candidates: int = 300
    latency_requests: int = 500
    n_estimators: int = 300  # upper bound; early stopping on the validation window picks fewer
    learning_rate: float = 0.1
    num_leaves: int = 15
    min_child_samples: int = 200
    negatives: int = 50  # random negatives kept per training group (every positive is kept)
    seed: int = 0

    def ranker(self, n_estimators: int | None = None) -> LambdaRanker:
        return LambdaRanker(
            n_estimators=n_estimators or self.n_estimators,
            learning_rate=self.learning_rate,
            num_leaves=self.num_leaves,
            min_child_samples=self.min_child_samples,
            random_state=self.seed,
        )


# --------------------------------------------------------------------------- data


def load_events(data: Path, workdir: Path, progress: bool = False) -> RecEvents:
    """Import the retail set into event tables, then keep the protocol's purchase lines."""
    from features.importers import DataImportError, import_online_retail
    from features.storage import read_table

    if not data.exists():
        raise BenchError(f"{data} not found: pass --data PATH to the Online Retail transactions.parquet")
    try:
        import_online_retail(data, workdir, progress=progress)
    except DataImportError as exc:
        raise BenchError(str(exc)) from None
    events = RecEvents.from_dir(workdir)
    users = read_table(workdir, "users", ["user_id", "is_guest"])
    return protocol_filter(events, users)


def protocol_filter(events: RecEvents, users: pd.DataFrame) -> RecEvents:
    """Purchases of registered customers (no guests) of items whose code starts with a digit."""
    guests = set(users.loc[users["is_guest"], "user_id"].astype(str))
    inter = events.interactions
    keep = (
        (inter["event_type"].astype(str) == "purchase")
        & (inter["quantity"] > 0)
        & ~inter["user_id"].astype(str).isin(guests)
        & inter["item_id"].astype(str).str.match(r"^\d")
    )
    items = events.items[events.items["item_id"].astype(str).str.match(r"^\d")]
    return RecEvents(inter[keep].reset_index(drop=True), items.reset_index(drop=True), events.creators)


def _utc(ts: str | pd.Timestamp) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


@dataclass(frozen=True)
class Split:
    train: pd.DataFrame  # purchases before train_end
    test: pd.DataFrame  # purchases in [train_end, test_end)
    users: list[str]  # persons in both periods

    def relevant(self, mode: str) -> pd.DataFrame:
        rel = (
            self.test[["user_id", "item_id"]]
            .drop_duplicates()
            .rename(columns={"user_id": "user", "item_id": "item"})
        )
        rel = rel[rel["user"].isin(set(self.users))]
        if mode == "new":
            seen = self.train[["user_id", "item_id"]].drop_duplicates()
            seen = seen.rename(columns={"user_id": "user", "item_id": "item"}).assign(seen=True)
            rel = rel.merge(seen, on=["user", "item"], how="left")
            rel = rel[rel["seen"].isna()].drop(columns="seen")
        return rel


def split(
    events: RecEvents, train_end: pd.Timestamp, test_end: pd.Timestamp, max_users: int | None, seed: int
) -> Split:
    inter = events.interactions
    times = pd.to_datetime(inter["event_time"], utc=True)
    cols = ["user_id", "item_id", "event_time"]
    train = inter.loc[times < train_end, cols]
    test = inter.loc[(times >= train_end) & (times < test_end), cols]
    users = np.intersect1d(train["user_id"].astype(str).unique(), test["user_id"].astype(str).unique())
    if len(users) == 0:
        raise BenchError(f"no person bought both before {train_end:%Y-%m-%d} and up to {test_end:%Y-%m-%d}")
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return Split(train, test, [str(u) for u in users])


# --------------------------------------------------------------------------- models


def run_baselines(sp: Split, k: int, step: Callable[[str], Any]) -> dict[str, dict[str, pd.DataFrame]]:
    from threadpoolctl import threadpool_limits

    data = bl.Interactions.from_purchases(sp.train)
    out: dict[str, dict[str, pd.DataFrame]] = {}
    with step("baseline: most popular"):
        out["most_popular"] = {m: bl.most_popular(data, sp.users, k, m == "new") for m in MODES}
    with step("baseline: re-buy then popular"):
        out["rebuy_then_popular"] = {m: bl.rebuy_then_popular(data, sp.users, k, m == "new") for m in MODES}
    with step("baseline: EASE"):
        out["ease"] = {m: bl.ease(data, sp.users, k, m == "new", lam=EASE_LAMBDA[m]) for m in MODES}
    with step("baseline: implicit ALS"), threadpool_limits(1, "blas"):
        out["als"] = {m: bl.als(data, sp.users, k, m == "new") for m in MODES}
    return out


def _windows(
    last_cutoff: pd.Timestamp, length: pd.Timedelta, n: int, step: pd.Timedelta
) -> list[pd.Timestamp]:
    """`n` cutoffs, `step` apart, the latest at `last_cutoff` (oldest first)."""
    return [last_cutoff - i * step for i in reversed(range(n))]


def train_ranker(
    events: RecEvents,
    train_end: pd.Timestamp,
    label_length: pd.Timedelta,
    rules: BusinessRules,
    config: BenchConfig,
    candidates: CandidateConfig,
    step: Callable[[str], Any],
    state_at: Callable[[pd.Timestamp], RecState],
) -> tuple[LambdaRanker, dict[str, Any]]:
    """Pick the number of trees on the same set-up one label window earlier, then refit.

    Final fit: label windows [c, c + L) whose labels end by `train_end`. Tuning: the same
    windows moved back by L, early-stopped on the latest window [train_end - L, train_end),
    scored on all its candidates (not subsampled), as the test will be.
    """
    mode = "all" if rules.allow_repeats else "new"
    stride = pd.Timedelta(days=config.window_step_days) if config.window_step_days else label_length
    final_cutoffs = _windows(train_end - label_length, label_length, config.training_windows, stride)
    tune_cutoffs = [c - label_length for c in final_cutoffs]

    def labelled(cutoff: pd.Timestamp, negatives: int | None) -> TrainingSet:
        label_end = cutoff + label_length
        with step(f"{mode}: training set, features < {cutoff:%Y-%m-%d}, labels to {label_end:%Y-%m-%d}"):
            return training_set(
                events,
                cutoff,
                label_end,
                rules=rules,
                config=candidates,
                negatives=negatives,
                seed=config.seed,
                state=state_at(cutoff),
            )

    tune_sets = [labelled(c, config.negatives) for c in tune_cutoffs]
    valid = labelled(final_cutoffs[-1], None)
    with step(f"{mode}: tune trees (validation window {final_cutoffs[-1]:%Y-%m-%d} .. {train_end:%Y-%m-%d})"):
        probe = config.ranker()
        probe.fit(
            np.vstack([s.X for s in tune_sets]),
            np.concatenate([s.y for s in tune_sets]),
            np.concatenate([s.group for s in tune_sets]),
            feature_names=valid.feature_names,
            eval_set=(valid.X, valid.y, valid.group),
        )
    final_sets = [labelled(c, config.negatives) for c in final_cutoffs]
    X = np.vstack([s.X for s in final_sets])
    y = np.concatenate([s.y for s in final_sets])
    group = np.concatenate([s.group for s in final_sets])
    trees = max(20, min(config.n_estimators, int(probe.best_iteration_ * 1.1)))
    with step(f"{mode}: fit ranker ({trees} trees, {len(group)} groups, {len(y):,} rows)"):
        ranker = config.ranker(trees)
        ranker.fit(X, y, group, feature_names=final_sets[0].feature_names)
    info = {
        "windows": [[f"{c:%Y-%m-%d}", f"{c + label_length:%Y-%m-%d}"] for c in final_cutoffs],
        "tuning_windows": [[f"{c:%Y-%m-%d}", f"{c + label_length:%Y-%m-%d}"] for c in tune_cutoffs],
        "validation_ndcg_at_10": round(float(probe.booster_.best_score["valid_0"]["ndcg@10"]), 4),
        "trees": trees,
        "groups": len(group),
        "rows": len(y),
        "candidate_recall_train": round(final_sets[-1].candidate_recall, 4),
        "top_features": sorted(ranker.feature_importance().items(), key=lambda kv: -kv[1])[:8],
    }
    return ranker, info


def person_histories(events: RecEvents, users: list[str]) -> dict[str, History]:
    """Each person's interactions as the Feast history row holds them (serving reads one per request)."""
    hist = History.from_frame(events.interactions)
    order = np.argsort(hist.user_id.astype(str), kind="stable")
    sorted_ids = hist.user_id[order].astype(str)
    wanted = set(users)
    out: dict[str, History] = {}
    starts = np.r_[0, np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1, len(sorted_ids)]
    for a, b in itertools.pairwise(starts):
        uid = str(sorted_ids[a])
        if uid in wanted:
            mask = np.zeros(len(hist), dtype=bool)
            mask[order[a:b]] = True
            out[uid] = hist.take(mask)
    return out


def measure_latency(
    rec: Recommender, users: list[str], n: int, seed: int, histories: dict[str, History] | None = None
) -> dict[str, float]:
    """Wall time of one request as the API serves it (in-process, without the store read).

    With `histories`: the person's rows are built from their history as of the snapshot
    (`person_state`, what serving does with the Feast row), then candidates + features +
    ranking + rules. Without: the same on a snapshot holding every person already.
    """
    rng = np.random.default_rng(seed)
    picks = rng.choice(users, size=min(n, len(users)), replace=len(users) < n)
    cat = rec.state.catalogue()

    def one(u: str) -> None:
        target = rec
        if histories is not None:
            state = person_state(cat, u, histories.get(u), rec.state.as_of)
            target = replace(rec, state=state)
        recommend(target, RecRequest(user_id=u, k=K))

    for u in picks[:10]:  # warm caches
        one(str(u))
    times = []
    for u in picks:
        t = time.perf_counter()
        one(str(u))
        times.append((time.perf_counter() - t) * 1000.0)
    arr = np.asarray(times)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "requests": len(arr),
        "candidates": rec.candidates.n,
        "person_rows_from_history": histories is not None,
    }


# --------------------------------------------------------------------------- run


def run(config: BenchConfig, progress: bool = True, events: RecEvents | None = None) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-ready result (`events`: already imported tables)."""
    from rich.console import Console

    console = Console(stderr=True, quiet=not progress)
    try:
        train_end, test_end = _utc(config.train_end), _utc(config.test_end)
    except ValueError as exc:
        raise BenchError(f"invalid date (want YYYY-MM-DD): {exc}") from None
    if test_end <= train_end:
        raise BenchError(f"--test-end {config.test_end} must be after --train-end {config.train_end}")
    started = time.perf_counter()

    @contextmanager
    def step(label: str) -> Iterator[None]:
        t = time.perf_counter()
        with console.status(label):
            yield
        console.log(f"{label}: {time.perf_counter() - t:.1f} s")

    if events is None:
        with (
            tempfile.TemporaryDirectory(prefix="aipic-retail-") as tmp,
            step("import Online Retail into event tables"),
        ):
            events = load_events(Path(config.data), Path(tmp))
    sp_ = split(events, train_end, test_end, config.max_users, config.seed)
    catalogue = sp_.train["item_id"].nunique()
    lists = run_baselines(sp_, config.k, step)

    cand_cfg = CandidateConfig(n=config.n_candidates)
    label_length = test_end - train_end
    trained: dict[str, dict[str, Any]] = {}
    rankers: dict[str, LambdaRanker] = {}
    states: dict[pd.Timestamp, RecState] = {}

    def state_at(t: pd.Timestamp) -> RecState:
        """Snapshots are shared by both modes (each costs an EASE inversion)."""
        if t not in states:
            states[t] = build_state(events, t)
        return states[t]

    with step(f"snapshot as of {train_end:%Y-%m-%d}"):
        state = state_at(train_end)
    for mode in MODES:
        rules = BusinessRules(allow_repeats=mode == "all", max_per_creator=None)
        ranker, info = train_ranker(events, train_end, label_length, rules, config, cand_cfg, step, state_at)
        rankers[mode], trained[mode] = ranker, info
        with step(f"{mode}: rank {len(sp_.users)} test persons"):
            recs = rank_batch(state, ranker, sp_.users, rules=rules, k=config.k, config=cand_cfg)
        lists.setdefault("aipic", {})[mode] = recs.rename(columns={"user_id": "user", "item_id": "item"})

    result: dict[str, Any] = {}
    for name, by_mode in lists.items():
        row: dict[str, float] = {}
        for mode in MODES:
            m = ranking_metrics(by_mode[mode], sp_.relevant(mode), config.k, catalogue)
            row[f"ndcg_at_{config.k}_{mode}"] = round(m["ndcg"], 4)
            row[f"recall_at_{config.k}_{mode}"] = round(m["recall"], 4)
            if mode == "all":
                row["coverage"] = round(m["coverage"], 4)
        result[name] = row
    with step("latency of one request"):
        histories = person_histories(events, sp_.users)
        for mode, key in (("all", "latency"), ("new", "latency_new")):
            rules = BusinessRules(allow_repeats=mode == "all", max_per_creator=None)
            rec = Recommender(state, {"personalized": rankers[mode]}, rules, cand_cfg)
            result[key] = {
                **measure_latency(rec, sp_.users, config.latency_requests, config.seed, histories),
                "repeats_allowed": mode == "all",
                "trees": rankers[mode].best_iteration_,
            }
    result["protocol"] = {
        **{k: str(v) for k, v in asdict(config).items()},
        "users": len(sp_.users),
        "users_with_new_items": int(sp_.relevant("new")["user"].nunique()),
        "catalogue": int(catalogue),
        "ease_lambda": EASE_LAMBDA,
        "training": trained,
        "seconds": round(time.perf_counter() - started, 1),
    }
    result["published"] = PUBLISHED
    return result


def print_table(result: dict[str, Any], k: int = K) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Online Retail next purchase, @{k}, {result['protocol']['users']} persons "
        "(all = repeats allowed, new = only items not bought before)"
    )
    for col in ("model", "nDCG all", "nDCG new", "recall all", "recall new", "cov."):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for name in ("most_popular", "rebuy_then_popular", "ease", "als", "aipic"):
        r = result[name]
        table.add_row(
            name,
            *(
                f"{r[key]:.4f}"
                for key in (
                    f"ndcg_at_{k}_all",
                    f"ndcg_at_{k}_new",
                    f"recall_at_{k}_all",
                    f"recall_at_{k}_new",
                )
            ),
            f"{r['coverage']:.3f}",
        )
    ref = ", ".join(
        f"{name} {v['all']:.3f}/{'—' if v['new'] is None else format(v['new'], '.3f')}"
        for name, v in PUBLISHED.items()
    )
    table.caption = f"README reference nDCG@10 all/new: {ref}"
    console = Console()
    console.print(table)
    for key in ("latency", "latency_new"):
        lat = result[key]
        mode = "repeats allowed" if lat["repeats_allowed"] else "only new items"
        console.print(
            f"one request, {mode} (person rows from history + candidates {lat['candidates']} + features "
            "+ ranking + rules, "
            f"in-process): p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms over {lat['requests']}"
        )


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
