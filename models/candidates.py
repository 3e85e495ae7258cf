"""Candidate generation: a few hundred plausible items per request, each tagged with its source.

Why several sources: the ranker can only reorder what it is given, so recall comes from mixing
what the person already likes (re-buy, co-purchase / co-view neighbours, favourite styles and
creators) with what everybody likes (trending, popular) and a little exploration (new items).
The source of an item is kept because it becomes the reason shown to the person.

Everything works on a block of requests at once with dense (requests × items) score matrices,
so a training set of thousands of persons and a single serving request run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from features.rec_features import RecState, Tier, rows_dense, rows_graph

# Priority order: small fixed quotas first, then co-purchase neighbours take what is left
# of the budget (the source with the best recall), then popular items fill up.
SOURCES: tuple[str, ...] = (
    "rebuy",
    "context",
    "co_view",
    "style",
    "creator",
    "trending",
    "new",
    "co_purchase",
    "popular",
)
SOURCE_CODE = {s: i for i, s in enumerate(SOURCES)}
PERSONAL_SOURCES = frozenset({"rebuy", "co_purchase", "co_view", "style", "creator"})


@dataclass(frozen=True)
class CandidateConfig:
    """How many candidates each source may contribute (in priority order); `popular` fills up."""

    n: int = 300
    quotas: dict[str, int] = field(
        default_factory=lambda: {
            "rebuy": 150,
            "context": 60,
            "co_view": 40,
            "style": 15,
            "creator": 15,
            "trending": 15,
            "new": 10,
            "co_purchase": 300,
        }
    )
    new_item_days: float = 14.0
    chunk: int = 256  # requests per dense block

    def __post_init__(self) -> None:
        unknown = set(self.quotas) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown candidate sources {sorted(unknown)}; known: {SOURCES}")
        if self.n < 1:
            raise ValueError("candidate budget n must be at least 1")


@dataclass(frozen=True)
class Candidates:
    """Flat candidate list: request position, item column, source code (first source that proposed it)."""

    rows: np.ndarray
    items: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def source_names(self) -> np.ndarray:
        return np.asarray(SOURCES, dtype=object)[self.sources]


def _item_scores(state: RecState, config: CandidateConfig) -> dict[str, np.ndarray]:
    """Scores of the sources that do not depend on the person (one vector per source, cached)."""
    key = f"item_scores:{config.new_item_days}"
    if key not in state.derived:
        state.derived[key] = _compute_item_scores(state, config)
    cached: dict[str, np.ndarray] = state.derived[key]
    return cached


def _compute_item_scores(state: RecState, config: CandidateConfig) -> dict[str, np.ndarray]:
    st = state.item_stats
    ok = state.item_active
    trend = np.where((st["item_pop_7d"] >= 2) & ok, st["item_trend"] * np.log1p(st["item_pop_7d"]), 0.0)
    fresh = state.item_created_days < config.new_item_days
    new = np.where(
        fresh & ok, 1.0 + np.log1p(st["item_pop_all"]) + 1.0 / (1.0 + state.item_created_days), 0.0
    )
    popular = np.where(ok, st["item_pop_30d"] + 1e-3 * st["item_pop_all"] + 1e-6, 0.0)
    return {"trending": trend, "new": new, "popular": popular}


def _personal_scores(
    state: RecState, rows: np.ndarray, source: str, config: CandidateConfig
) -> np.ndarray | None:
    """Scores (len(rows) × items) of a person-based source; unknown persons score 0."""
    known = rows >= 0
    if not known.any():
        return None
    out = np.zeros((len(rows), state.n_items))
    r = rows[known]
    if source == "rebuy":
        out[known] = rows_dense(state.buys_decay, r)
    elif source == "co_purchase":  # EASE weights, cosine neighbours as a tie-breaker
        ease = rows_graph(state, "bought", "ease", r)
        out[known] = ease + 1e-3 * rows_graph(state, "buys_decay", "copurchase", r)
    elif source == "co_view":
        if state.coview.nnz == 0:
            return None
        out[known] = rows_graph(state, "views_decay", "coview", r)
    elif source == "style":
        aff = rows_dense(state.style_aff, r)[:, state.item_style]
        out[known] = aff * np.log1p(state.item_stats["item_pop_30d"])[None, :]
    elif source == "creator":
        aff = rows_dense(state.creator_aff, r)[:, state.item_creator]
        freshness = 1.0 / (1.0 + state.item_created_days / 30.0)
        out[known] = aff * (freshness + 0.1 * np.log1p(state.item_stats["item_pop_30d"]))[None, :]
    return out


def _context_scores(state: RecState, context: np.ndarray) -> np.ndarray | None:
    """Neighbours of the item on screen, then same-style popular items (no profile needed)."""
    has = context >= 0
    if not has.any():
        return None
    c = context[has]
    out = np.zeros((len(context), state.n_items))
    graph = rows_dense(state.copurchase, c) + rows_dense(state.coview, c)
    same_style = state.item_style[None, :] == state.item_style[c][:, None]
    pop = np.log1p(state.item_stats["item_pop_30d"])[None, :]
    out[has] = graph + 1e-3 * same_style * (1.0 + pop)
    out[has, c] = 0.0
    return out


def _take_top(
    scores: np.ndarray, taken: np.ndarray, quota: np.ndarray | int
) -> tuple[np.ndarray, np.ndarray]:
    """Best positive-scored, not yet taken items per row, at most `quota` (scalar or per row)."""
    if scores.shape[0] == 1:
        return _take_top_one(scores[0], taken[0], int(np.asarray(quota).reshape(-1)[0]))
    s = np.where(taken, 0.0, scores)
    q = np.broadcast_to(np.asarray(quota), (s.shape[0],))
    qmax = int(q.max()) if len(q) else 0
    if qmax <= 0 or not (s > 0).any():  # nothing to take: skip the partition
        return np.empty(0, np.int64), np.empty(0, np.int64)
    qmax = min(qmax, s.shape[1])
    part = (
        np.argpartition(-s, qmax - 1, axis=1)[:, :qmax]
        if qmax < s.shape[1]
        else np.tile(np.arange(s.shape[1]), (s.shape[0], 1))
    )
    at = np.arange(s.shape[0])[:, None]  # row of every entry (plain indexing: take_along_axis)
    vals = s[at, part]
    order = np.argsort(-vals, axis=1, kind="stable")
    part = part[at, order]
    vals = vals[at, order]
    keep = (vals > 0) & (np.arange(qmax)[None, :] < q[:, None])
    r, j = np.nonzero(keep)
    return r, part[r, j]


def _take_top_one(scores: np.ndarray, taken: np.ndarray, quota: int) -> tuple[np.ndarray, np.ndarray]:
    """`_take_top` of one request (every served request): the same partition and sort of the
    same row, without the per-row bookkeeping of a block."""
    s = np.where(taken, 0.0, scores)
    pos = s > 0
    if quota <= 0 or not pos.any():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    q = min(quota, len(s))
    part = np.argpartition(-s, q - 1)[:q] if q < len(s) else np.arange(len(s))
    vals = s[part]
    order = np.argsort(-vals, kind="stable")
    part, vals = part[order], vals[order]
    items = part[vals > 0]
    return np.zeros(len(items), np.int64), items


def generate(
    state: RecState,
    user_rows: np.ndarray,
    *,
    tier: Tier = "personalized",
    context: np.ndarray | None = None,
    exclude: sp.csr_matrix | np.ndarray | None = None,
    config: CandidateConfig | None = None,
) -> Candidates:
    """Candidates for each request (a person row, -1 if unknown, and an optional context item).

    `exclude` (requests × items, truthy = never propose) carries the business rules known up
    front. In the limited tier the person's rows are ignored: only context and item sources run.
    """
    cfg = config or CandidateConfig()
    user_rows = np.asarray(user_rows, dtype=np.int64)
    n_req = len(user_rows)
    ctx = np.full(n_req, -1, np.int64) if context is None else np.asarray(context, dtype=np.int64)
    if tier == "limited":
        user_rows = np.full(n_req, -1, np.int64)
    item_scores = _item_scores(state, cfg)
    inactive = ~state.item_active
    out_r, out_i, out_s = [], [], []
    for start in range(0, n_req, cfg.chunk):
        rows = user_rows[start : start + cfg.chunk]
        cx = ctx[start : start + cfg.chunk]
        taken = np.broadcast_to(inactive, (len(rows), state.n_items)).copy()
        if exclude is not None:
            block = exclude[start : start + cfg.chunk]
            taken |= (
                sp.csr_matrix(block).toarray().astype(bool)
                if sp.issparse(block)
                else np.asarray(block, dtype=bool)
            )
        count = np.zeros(len(rows), dtype=np.int64)
        for source in SOURCES:
            if source == "popular":
                quota: np.ndarray | int = np.maximum(cfg.n - count, 0)
            else:
                quota = np.minimum(cfg.quotas.get(source, 0), np.maximum(cfg.n - count, 0))
            if np.max(quota, initial=0) <= 0:
                continue
            if source in item_scores:
                scores = np.broadcast_to(item_scores[source], (len(rows), state.n_items))
            elif source == "context":
                ctx_scores = _context_scores(state, cx)
                if ctx_scores is None:
                    continue
                scores = ctx_scores
            else:
                personal = _personal_scores(state, rows, source, cfg)
                if personal is None:
                    continue
                scores = personal
            r, i = _take_top(scores, taken, quota)
            taken[r, i] = True
            count += np.bincount(r, minlength=len(rows))
            out_r.append(r + start)
            out_i.append(i)
            out_s.append(np.full(len(r), SOURCE_CODE[source], dtype=np.int8))
    if not out_r:
        empty = np.empty(0, np.int64)
        return Candidates(empty, empty, np.empty(0, np.int8))
    rows_all = np.concatenate(out_r)
    order = np.argsort(rows_all, kind="stable")
    return Candidates(rows_all[order], np.concatenate(out_i)[order], np.concatenate(out_s)[order])
