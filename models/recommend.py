"""Recommendations end to end: candidates -> features -> rank -> business rules -> reasons.

Why one module: serving, training and the benchmark must see the same candidates, the same
features and the same rules, otherwise offline figures say nothing about production.
`score_requests` is that shared path for a block of requests; `rank_batch` adds the business
rules (benchmark, batch jobs), `recommend` serves one request and attaches a reason to every
item, and `training_set` labels the same candidates with what people bought next.

Business rules: never a person's own pictures, never removed / unavailable / flagged items,
never items already bought when the catalogue forbids repeats (AIpicMarket sells one-off
digital goods), at most `max_per_creator` per creator in the top k, and 1 <= k <= MAX_K.
A served request of the limited tier reads nothing of the person's history, so it does not
filter their past purchases (no personal data without consent: the client may pass them in
`exclude_item_ids`); the person's own pictures (catalogue data, not history) stay filtered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.rec_features import (
    RecEvents,
    RecState,
    Tier,
    build_state,
    pair_features,
    row_dense,
    row_entries,
    tier_feature_names,
)
from models.candidates import SOURCES, CandidateConfig, Candidates, generate
from models.ranker import LambdaRanker

MAX_K = 100


class RecommendError(ValueError):
    """A request the recommender refuses (k out of bounds, unknown tier, model missing)."""


@dataclass(frozen=True)
class BusinessRules:
    """What may never be shown, whatever the model thinks."""

    allow_repeats: bool = False
    max_per_creator: int | None = 3
    blocked_items: frozenset[str] = frozenset()  # e.g. flagged by fraud review after the snapshot

    def __post_init__(self) -> None:
        if self.max_per_creator is not None and self.max_per_creator < 1:
            raise RecommendError("max_per_creator must be at least 1 (or None for no cap)")


@dataclass(frozen=True)
class RecRequest:
    user_id: str | None
    k: int = 10
    tier: Tier = "personalized"
    context_item_id: str | None = None
    exclude_item_ids: frozenset[str] = frozenset()  # e.g. bought in this session, after the snapshot


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    score: float
    source: str
    reason: str


@dataclass
class Recommender:
    """A snapshot, one ranker per tier and the rules: everything one request needs, in memory."""

    state: RecState
    rankers: dict[str, LambdaRanker]
    rules: BusinessRules = field(default_factory=BusinessRules)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    item_labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Scored:
    """Candidates of a block of requests with their feature matrix and (optionally) scores."""

    candidates: Candidates
    features: np.ndarray
    scores: np.ndarray | None = None


def check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise RecommendError(f"k must be between 1 and {MAX_K}; got {k}")
    return k


def exclusion_matrix(
    state: RecState,
    user_ids: Sequence[str | None],
    rules: BusinessRules,
    extra: Sequence[frozenset[str]] | None = None,
    *,
    purchases: bool = True,
) -> sp.csr_matrix:
    """Requests × items, nonzero = never show: own pictures, already bought (no repeats), blocked.

    Built from (request, item) pairs gathered straight from the CSR arrays: one request costs
    microseconds, a batch of thousands one vectorised pass. `purchases=False` leaves out the
    rule that reads the persons' purchases (the limited tier uses no personal history).
    """
    r, c = _exclusion_pairs(state, user_ids, rules, extra, purchases)
    return sp.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(len(user_ids), state.n_items))


def _exclusion_pairs(
    state: RecState,
    user_ids: Sequence[str | None],
    rules: BusinessRules,
    extra: Sequence[frozenset[str]] | None,
    purchases: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(request, item column) of every item a request must never show (see `exclusion_matrix`)."""
    n = len(user_ids)
    pairs_r: list[np.ndarray] = []
    pairs_c: list[np.ndarray] = []
    if purchases and not rules.allow_repeats:
        rows = (
            np.array([state.user_row(user_ids[0])])
            if n == 1
            else state.users.get_indexer(pd.Index([u if u is not None else "\0" for u in user_ids]))
        )
        known = np.flatnonzero(rows >= 0)
        if len(known):
            pos, cols = row_entries(state.bought, rows[known])
            pairs_r.append(known[pos])
            pairs_c.append(cols)
    if state.creator_owner:
        for req, uid in enumerate(user_ids):
            codes = state.creator_owner.get(uid) if uid is not None else None
            if codes is not None and len(codes):
                _, cols = row_entries(state.creator_items(), codes)
                pairs_r.append(np.full(len(cols), req))
                pairs_c.append(cols)
    if rules.blocked_items:
        cols = state.item_cols(sorted(rules.blocked_items))
        cols = cols[cols >= 0]
        pairs_r.append(np.repeat(np.arange(n), len(cols)))
        pairs_c.append(np.tile(cols, n))
    for req, items in enumerate(extra or []):
        if items:
            cols = state.item_cols(sorted(items))
            cols = cols[cols >= 0]
            pairs_r.append(np.full(len(cols), req))
            pairs_c.append(cols)
    r = np.concatenate(pairs_r) if pairs_r else np.empty(0, np.int64)
    c = np.concatenate(pairs_c) if pairs_c else np.empty(0, np.int64)
    return r, c


def score_requests(
    state: RecState,
    ranker: LambdaRanker | None,
    user_rows: np.ndarray,
    *,
    tier: Tier,
    context: np.ndarray | None = None,
    exclude: sp.csr_matrix | np.ndarray | None = None,
    config: CandidateConfig | None = None,
) -> Scored:
    """The shared path: candidates, then the tier's features, then (if a ranker) scores."""
    user_rows = np.asarray(user_rows, dtype=np.int64)
    if tier == "limited":
        user_rows = np.full(len(user_rows), -1, np.int64)  # no profile at all
    cands = generate(state, user_rows, tier=tier, context=context, exclude=exclude, config=config)
    ctx = None if context is None else np.asarray(context, dtype=np.int64)[cands.rows]
    X = pair_features(state, user_rows[cands.rows], cands.items, ctx, tier_feature_names(tier))
    scores = ranker.predict(X) if ranker is not None and len(X) else None
    return Scored(cands, X, scores)


@dataclass(frozen=True)
class Ranked:
    """Top-k lists of a block of requests, sorted by request then rank (parallel arrays)."""

    requests: np.ndarray
    items: np.ndarray
    ranks: np.ndarray
    scores: np.ndarray
    sources: np.ndarray
    rows: np.ndarray  # position of each item in the scored candidates (its row of the features)


def _position_in_run(*keys: np.ndarray) -> np.ndarray:
    """0-based position of each row within its run of equal keys (rows already grouped)."""
    n = len(keys[0])
    if n == 0:
        return np.empty(0, np.int64)
    new = np.zeros(n, dtype=bool)
    new[0] = True
    for key in keys:
        new[1:] |= key[1:] != key[:-1]
    start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    return np.arange(n) - start


def top_k(state: RecState, scored: Scored, k: int, max_per_creator: int | None) -> Ranked:
    """Best k per request after dropping inactive items and applying the per-creator cap."""
    c = scored.candidates
    if scored.scores is None:
        raise RecommendError("top_k needs scored candidates (a ranker)")
    ok = state.item_active[c.items]
    at = np.flatnonzero(ok)
    req, item, score, src = c.rows[ok], c.items[ok], scored.scores[ok], c.sources[ok]
    order = np.lexsort((-score, req))
    req, item, score, src, at = req[order], item[order], score[order], src[order], at[order]
    if max_per_creator is not None:
        creator = state.item_creator[item]
        by_creator = np.lexsort((np.arange(len(req)), creator, req))  # keeps score order inside
        within = np.empty(len(req), np.int64)
        within[by_creator] = _position_in_run(req[by_creator], creator[by_creator])
        keep = within < max_per_creator
        req, item, score, src, at = req[keep], item[keep], score[keep], src[keep], at[keep]
    rank = _position_in_run(req) + 1
    keep = rank <= k
    return Ranked(req[keep], item[keep], rank[keep], score[keep], src[keep], at[keep])


def rank_batch(
    state: RecState,
    ranker: LambdaRanker,
    user_ids: Sequence[str | None],
    *,
    tier: Tier = "personalized",
    rules: BusinessRules | None = None,
    k: int = 10,
    context_ids: Sequence[str | None] | None = None,
    config: CandidateConfig | None = None,
) -> pd.DataFrame:
    """Top-k lists for many requests: user_id, item_id, rank, score, source."""
    rules = rules or BusinessRules()
    check_k(k)
    rows = state.users.get_indexer(pd.Index([u if u is not None else "\0" for u in user_ids]))
    context = None
    if context_ids is not None:
        context = state.items.get_indexer(pd.Index([c if c is not None else "\0" for c in context_ids]))
    exclude = exclusion_matrix(state, user_ids, rules, purchases=tier == "personalized")
    scored = score_requests(state, ranker, rows, tier=tier, context=context, exclude=exclude, config=config)
    if scored.scores is None:
        return pd.DataFrame(columns=["user_id", "item_id", "rank", "score", "source"])
    best = top_k(state, scored, k, rules.max_per_creator)
    return pd.DataFrame(
        {
            "user_id": np.asarray(user_ids, dtype=object)[best.requests],
            "item_id": state.items.to_numpy()[best.items],
            "rank": best.ranks,
            "score": best.scores,
            "source": np.asarray(SOURCES, dtype=object)[best.sources],
        }
    )


@dataclass(frozen=True)
class ScoredRequest:
    """One request's candidates, their model inputs and scores, and where it stood."""

    scored: Scored
    row: int  # the person's row in the state (-1: no profile used)
    ctx_col: int  # the picture on screen (-1: none)


def score_request(rec: Recommender, request: RecRequest) -> ScoredRequest:
    """Candidates, features and scores of one request (before the top-k and the reasons).

    The serving path's model inputs: the online/offline parity test compares these vectors,
    for every candidate, with the ones the training code computes as of the same time.
    """
    check_k(request.k)
    ranker = rec.rankers.get(request.tier)
    if ranker is None:
        raise RecommendError(f"no ranker for tier {request.tier!r}; have {sorted(rec.rankers)}")
    state = rec.state
    row = state.user_row(request.user_id) if request.tier == "personalized" else -1
    ctx_col = state.item_col(request.context_item_id)
    hidden = request.exclude_item_ids
    if request.context_item_id is not None:  # never recommend the item already on screen
        hidden = hidden | {request.context_item_id}
    # the limited tier reads nothing of the person's history, not even to filter purchases
    r, c = _exclusion_pairs(
        state, [request.user_id], rec.rules, [hidden], purchases=request.tier == "personalized"
    )
    exclude = np.zeros((1, state.n_items), dtype=bool)  # one request: the dense row generate uses
    exclude[r, c] = True
    scored = score_requests(
        state,
        ranker,
        np.array([row]),
        tier=request.tier,
        context=np.array([ctx_col]),
        exclude=exclude,
        config=rec.candidates,
    )
    return ScoredRequest(scored, row, ctx_col)


@dataclass(frozen=True)
class Served:
    """One served request: its items with reasons, and the model input each was ranked on."""

    items: list[Recommendation]
    features: np.ndarray  # one row per item: its row of the scored feature matrix


def recommend(rec: Recommender, request: RecRequest) -> list[Recommendation]:
    """Serve one request: at most k items, each with the reason it is shown."""
    return serve(rec, request).items


def serve(rec: Recommender, request: RecRequest) -> Served:
    """`recommend`, keeping the exact model input of every returned item (for the decision log)."""
    one = score_request(rec, request)
    scored, row, ctx_col = one.scored, one.row, one.ctx_col
    if scored.scores is None:
        return Served([], scored.features[:0])
    state = rec.state
    best = top_k(state, scored, request.k, rec.rules.max_per_creator)
    reasons = explain(state, row, best.items, best.sources, ctx_col, rec.item_labels)
    items = [
        Recommendation(str(state.items[i]), float(s), SOURCES[src], reason)
        for i, s, src, reason in zip(best.items, best.scores, best.sources, reasons, strict=True)
    ]
    return Served(items, scored.features[best.rows])


def explain(
    state: RecState,
    row: int,
    items: np.ndarray,
    sources: np.ndarray,
    ctx_col: int,
    labels: Mapping[str, str] | None = None,
) -> list[str]:
    """A sentence per item a person understands, from the source that proposed it."""
    labels = labels or {}

    def label(col: int) -> str:
        item_id = str(state.items[col])
        return f'"{labels.get(item_id, item_id)}"'

    def style(col: int) -> str:
        return str(state.styles[state.item_style[col]])

    def anchor(history: sp.csr_matrix, graph: str, col: int) -> int | None:
        """The item of the person's history most similar to `col`."""
        if row < 0:
            return None
        mine = history.indices[history.indptr[row] : history.indptr[row + 1]]
        if len(mine) == 0:
            return None
        sims = row_dense(state.transposed(graph), col)[mine]  # graph[mine, col]
        return int(mine[int(np.argmax(sims))]) if sims.max() > 0 else None

    out = []
    for col, code in zip(items.tolist(), sources.tolist(), strict=True):
        source = SOURCES[code]
        fresh = state.item_created_days[col] < 14
        if source == "rebuy":
            reason = "you bought this before"
        elif source == "co_purchase":
            a = anchor(state.bought, "copurchase", col)
            reason = (
                f"because you bought {label(a)}" if a is not None else "bought together with your purchases"
            )
        elif source == "co_view":
            a = anchor(state.views, "coview", col)
            reason = (
                f"because you viewed {label(a)}" if a is not None else "viewed together with what you viewed"
            )
        elif source == "context":
            reason = (
                f"people who liked {label(ctx_col)} also liked this" if ctx_col >= 0 else "similar pictures"
            )
        elif source == "style":
            reason = f"because you like {style(col)} pictures"
        elif source == "creator":
            reason = "new from a creator you like" if fresh else "more from a creator you like"
        elif source == "trending":
            reason = f"popular in {style(col)} this week"
        elif source == "new":
            reason = f"new in {style(col)}"
        else:
            reason = f"a best-seller in {style(col)}"
        out.append(reason)
    return out


# --------------------------------------------------------------------------------------------
# Training data from the same path.


@dataclass(frozen=True)
class TrainingSet:
    X: np.ndarray
    y: np.ndarray
    group: np.ndarray
    feature_names: list[str]
    users: np.ndarray  # user id of every group
    candidate_recall: float  # share of next-window purchases the candidates contained


def training_set(
    events: RecEvents,
    cutoff: pd.Timestamp | str,
    label_end: pd.Timestamp | str,
    *,
    tier: Tier = "personalized",
    rules: BusinessRules | None = None,
    config: CandidateConfig | None = None,
    users: Sequence[str] | None = None,
    state: RecState | None = None,
    with_context: bool = False,
    negatives: int | None = None,
    seed: int = 0,
) -> TrainingSet:
    """Features as of `cutoff`, label 1 for candidates the person bought in [cutoff, label_end).

    Only persons known before the cutoff who bought in the label window form groups, and
    groups without any positive are dropped (they carry no ranking signal). `with_context`
    stands the person's last item before the cutoff in for the picture on screen (how the
    limited tier learns to use the request's context). `negatives` keeps every positive and
    that many random negatives per group: faster to fit, and on Online Retail's validation
    windows it ranked better than all 300 candidates (fewer easy negatives to fit).
    """
    rules = rules or BusinessRules()
    state = state or build_state(events, cutoff)
    inter = events.interactions
    times = pd.to_datetime(inter["event_time"], utc=True)
    window = inter[
        (inter["event_type"].astype(str) == "purchase") & (times >= state.as_of) & (times < _utc(label_end))
    ]
    future = pd.DataFrame(
        {
            "u": state.users.get_indexer(pd.Index(window["user_id"].astype(str))),
            "i": state.items.get_indexer(pd.Index(window["item_id"].astype(str))),
        }
    )
    future = future[(future["u"] >= 0) & (future["i"] >= 0)].drop_duplicates()
    rows = np.unique(future["u"].to_numpy())
    if users is not None:
        rows = np.intersect1d(rows, state.users.get_indexer(pd.Index(list(users))))
    user_ids = [str(u) for u in state.users[rows]]
    exclude = exclusion_matrix(state, user_ids, rules, purchases=tier == "personalized")  # as served
    future = future[future["u"].isin(rows)]
    if not rules.allow_repeats:  # relevance = items not bought before
        before = state.bought[future["u"].to_numpy(), future["i"].to_numpy()]
        future = future[np.asarray(before).ravel() == 0]
    context = _last_items(inter, times, state, rows) if with_context else None
    scored = score_requests(state, None, rows, tier=tier, context=context, exclude=exclude, config=config)
    c = scored.candidates
    key = rows[c.rows] * np.int64(state.n_items) + c.items
    pos_key = future["u"].to_numpy(np.int64) * np.int64(state.n_items) + future["i"].to_numpy(np.int64)
    y = np.isin(key, pos_key).astype(np.int32)
    recall = float(y.sum() / max(len(pos_key), 1))
    has_pos = np.bincount(c.rows, weights=y, minlength=len(rows)) > 0
    keep = has_pos[c.rows]
    if negatives is not None:
        neg = np.flatnonzero(keep & (y == 0))
        rng = np.random.default_rng(seed)
        shuffled = neg[np.lexsort((rng.random(len(neg)), c.rows[neg]))]
        keep[shuffled[_position_in_run(c.rows[shuffled]) >= negatives]] = False
    sizes = np.bincount(c.rows[keep], minlength=len(rows))
    return TrainingSet(
        X=scored.features[keep],
        y=y[keep],
        group=sizes[sizes > 0],
        feature_names=tier_feature_names(tier),
        users=np.asarray(user_ids, dtype=object)[has_pos],
        candidate_recall=recall,
    )


def _last_items(inter: pd.DataFrame, times: pd.Series, state: RecState, rows: np.ndarray) -> np.ndarray:
    """Column of each person's latest interaction before the snapshot (-1 if none)."""
    before = inter.loc[times < state.as_of, ["user_id", "item_id"]].assign(t=times[times < state.as_of])
    last = before.sort_values("t").groupby("user_id")["item_id"].last()
    last_col = pd.Series(state.items.get_indexer(pd.Index(last.astype(str))), index=last.index.astype(str))
    return last_col.reindex(state.users[rows]).fillna(-1).to_numpy(np.int64)


def _utc(ts: pd.Timestamp | str) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
