"""Recommender training through MLflow: tiers from the registry, consent, beating popularity."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.privacy.registry import get_registry
from features.rec_features import REC_FEATURES
from training import registry
from training.recommender import promote_recommender, rec_tiers, tier_feature_names, train_recommender


def test_limited_tier_has_no_personal_feature() -> None:
    by_name = {f.name: f for f in REC_FEATURES}
    limited = tier_feature_names("limited")
    assert limited, "the limited tier needs some context/popularity inputs"
    assert all(not any(c.startswith("user") for c in by_name[n].categories) for n in limited)
    assert set(limited) < set(tier_feature_names("personalized"))
    assert rec_tiers() == [t.name for t in get_registry().purpose("personalised_recommendations").tiers]


@pytest.mark.slow
def test_train_both_tiers_and_promotion_rule(small_marketplace: Path, mlflow_store: Path) -> None:
    out = train_recommender(small_marketplace, ["personalized", "limited"])
    for tier in ("personalized", "limited"):
        result = out["tiers"][tier]
        assert result["champion"] is True
        m = result["metrics"]
        # both tiers must beat plain popularity on the later window; the limited one by context alone
        assert m["ndcg_at_10"] > m["ndcg_at_10_popularity"], (tier, m)
        bundle = registry.load_bundle(f"recommender-{tier}")
        assert bundle.feature_names == tier_feature_names(tier)
    assert (
        out["tiers"]["limited"]["metrics"]["test_users"]
        >= out["tiers"]["personalized"]["metrics"]["test_users"]
    )
    # without a new version the champion stays; nothing to promote against itself
    res = promote_recommender(small_marketplace, "recommender-limited")["recommender-limited"]
    assert res["promoted"] is False and res["champion_before"] == res["challenger"]
