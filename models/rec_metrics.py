"""Top-k recommendation metrics with binary relevance (nDCG@k, recall@k, catalogue coverage).

Why a module of its own: the benchmark, the training run and the promotion check must compute
the same numbers the same way. Inputs are long frames (one row per recommended or relevant
item), so every metric is a join and a group-by, never a loop over persons.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


class RankMetricError(ValueError):
    """Recommendation lists that cannot be scored (duplicates, bad ranks, missing columns)."""


def _check(recs: pd.DataFrame, relevant: pd.DataFrame) -> None:
    for name, df, cols in (
        ("recs", recs, {"user", "item", "rank"}),
        ("relevant", relevant, {"user", "item"}),
    ):
        missing = cols - set(df.columns)
        if missing:
            raise RankMetricError(f"{name}: missing columns {sorted(missing)}")
    if recs.duplicated(["user", "item"]).any():
        raise RankMetricError("recs: an item appears twice in one person's list")
    if (recs["rank"] < 1).any():
        raise RankMetricError("recs: ranks start at 1")


def per_user_metrics(recs: pd.DataFrame, relevant: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """nDCG@k and recall@k for every person with at least one relevant item.

    `recs`: user, item, rank (1 = top). `relevant`: user, item. Binary relevance:
    DCG = Σ 1/log2(rank+1) over hits in the top k; the ideal DCG puts min(k, |relevant|) hits
    first. Recall@k = hits / |relevant|. Persons without relevant items are left out.
    """
    _check(recs, relevant)
    rel = relevant[["user", "item"]].drop_duplicates()
    n_rel = rel.groupby("user").size().rename("n_rel")
    top = recs[recs["rank"] <= k]
    hits = top.merge(rel, on=["user", "item"], how="inner")
    gain = (1.0 / np.log2(hits["rank"].to_numpy(np.float64) + 1.0)).astype(np.float64)
    dcg = pd.Series(gain, index=hits["user"].to_numpy()).groupby(level=0).sum()
    n_hits = hits.groupby("user").size()
    discounts = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))
    out = n_rel.to_frame()
    ideal = discounts[np.minimum(out["n_rel"].to_numpy(), k) - 1]
    out["ndcg"] = dcg.reindex(out.index, fill_value=0.0).to_numpy() / ideal
    out["recall"] = n_hits.reindex(out.index, fill_value=0).to_numpy() / out["n_rel"].to_numpy()
    return out


def ranking_metrics(
    recs: pd.DataFrame, relevant: pd.DataFrame, k: int = 10, catalogue_size: int | None = None
) -> dict[str, float]:
    """Mean nDCG@k and recall@k over persons with relevant items; coverage of the catalogue."""
    per_user = per_user_metrics(recs, relevant, k)
    result = {
        "ndcg": float(per_user["ndcg"].mean()) if len(per_user) else float("nan"),
        "recall": float(per_user["recall"].mean()) if len(per_user) else float("nan"),
        "users": float(len(per_user)),
    }
    if catalogue_size:
        shown = recs.loc[recs["rank"] <= k, "item"].nunique()
        result["coverage"] = float(shown / catalogue_size)
    return result
