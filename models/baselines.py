"""Reference recommenders the ranker has to beat: most popular, re-buy then popular, EASE, ALS.

Why they live in the project: a benchmark figure means something only next to simple methods
computed on the same split in the same run. All of them read a purchases frame (user_id,
item_id, event_time) of the training period and return top-k lists (user, item, rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass(frozen=True)
class Interactions:
    """Training purchases as a users × items count matrix with its indexes."""

    users: pd.Index
    items: pd.Index
    counts: sp.csr_matrix

    @classmethod
    def from_purchases(cls, purchases: pd.DataFrame) -> Interactions:
        users = pd.Index(np.sort(purchases["user_id"].astype(str).unique()))
        items = pd.Index(np.sort(purchases["item_id"].astype(str).unique()))
        r = users.get_indexer(pd.Index(purchases["user_id"].astype(str)))
        c = items.get_indexer(pd.Index(purchases["item_id"].astype(str)))
        counts = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(len(users), len(items)))
        return cls(users, items, counts)

    @property
    def binary(self) -> sp.csr_matrix:
        b = self.counts.copy()
        b.data[:] = 1.0
        return b

    def popularity(self) -> np.ndarray:
        """Distinct buyers per item."""
        return np.asarray(self.binary.sum(axis=0), dtype=np.float64).ravel()


def top_k_lists(
    data: Interactions, users: Sequence[str], scores: np.ndarray, k: int, exclude_bought: bool
) -> pd.DataFrame:
    """Turn a (len(users) × items) score matrix into top-k lists, optionally hiding past purchases."""
    rows = data.users.get_indexer(pd.Index(list(users)))
    s = np.array(scores, dtype=np.float64, copy=True)
    if exclude_bought:
        known = rows >= 0
        bought = data.binary[rows[known]].toarray() > 0
        s[np.flatnonzero(known)] = np.where(bought, -np.inf, s[known])
    k = min(k, s.shape[1])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(s, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    part = np.take_along_axis(part, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    valid = np.isfinite(vals)
    r, j = np.nonzero(valid)
    return pd.DataFrame(
        {
            "user": np.asarray(list(users), dtype=object)[r],
            "item": data.items.to_numpy()[part[r, j]],
            "rank": j + 1,
        }
    )


def most_popular(
    data: Interactions, users: Sequence[str], k: int = 10, exclude_bought: bool = False
) -> pd.DataFrame:
    """The same list for everyone: items with the most distinct buyers."""
    scores = np.broadcast_to(data.popularity(), (len(users), len(data.items)))
    return top_k_lists(data, users, scores, k, exclude_bought)


def rebuy_then_popular(
    data: Interactions, users: Sequence[str], k: int = 10, exclude_bought: bool = False
) -> pd.DataFrame:
    """The person's most often bought items first (ties by popularity), then the most popular.

    With `exclude_bought` nothing can be re-bought and this is exactly `most_popular`.
    """
    pop = data.popularity()
    rows = data.users.get_indexer(pd.Index(list(users)))
    pop_scaled = pop / (pop.max() + 1.0)  # < 1: breaks ties, never beats one more purchase
    scores = np.broadcast_to(pop_scaled / 1e3, (len(users), len(data.items))).copy()
    known = rows >= 0
    scores[np.flatnonzero(known)] += (
        data.counts[rows[known]].toarray() + (data.counts[rows[known]].toarray() > 0) * (pop_scaled[None, :])
    )
    return top_k_lists(data, users, scores, k, exclude_bought)


def ease_scores(data: Interactions, users: Sequence[str], lam: float) -> np.ndarray:
    """EASE (Steck 2019): closed-form item-item model B = -P / diag(P), P = (XᵀX + λI)⁻¹."""
    x = data.binary
    gram = np.asarray((x.T @ x).toarray(), dtype=np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    rows = data.users.get_indexer(pd.Index(list(users)))
    out = np.zeros((len(users), len(data.items)))
    known = rows >= 0
    out[known] = x[rows[known]] @ b
    return out


def ease(
    data: Interactions, users: Sequence[str], k: int = 10, exclude_bought: bool = False, lam: float = 200.0
) -> pd.DataFrame:
    return top_k_lists(data, users, ease_scores(data, users, lam), k, exclude_bought)


def als(
    data: Interactions,
    users: Sequence[str],
    k: int = 10,
    exclude_bought: bool = False,
    factors: int = 64,
    regularization: float = 0.05,
    iterations: int = 15,
    seed: int = 0,
) -> pd.DataFrame:
    """implicit's alternating least squares on the binary purchase matrix."""
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(
        factors=factors, regularization=regularization, iterations=iterations, random_state=seed
    )
    model.fit(data.binary, show_progress=False)
    rows = data.users.get_indexer(pd.Index(list(users)))
    scores = np.zeros((len(users), len(data.items)))
    known = rows >= 0
    scores[known] = np.asarray(model.user_factors)[rows[known]] @ np.asarray(model.item_factors).T
    return top_k_lists(data, users, scores, k, exclude_bought)
