"""Every FeatureService and every model's inputs stay inside what its purpose and tier allow."""

from __future__ import annotations

import pytest

from features.feature_repo import feature_sets
from features.privacy.registry import PurposeViolation, allowed_features, check_feature_service
from training.fraud_data import FRAUD_PURPOSE, fraud_tiers, tier_features
from training.recommender import PURPOSE as REC_PURPOSE
from training.recommender import rec_tiers, tier_feature_names

PURPOSE_OF_MODEL = {"fraud": FRAUD_PURPOSE, "recommender": REC_PURPOSE}

pytestmark = pytest.mark.consent


def test_feature_services_match_the_registry_exactly() -> None:
    for fs in feature_sets():
        purpose = PURPOSE_OF_MODEL[fs.model]
        for tier in fs.tiers:
            names = [f.name for f in fs.tier_features(tier)]
            check_feature_service(purpose, tier, names)
            derived = {f.name for f in allowed_features(purpose, tier, fs.features)}
            assert set(names) == derived, f"{fs.model}/{tier} differs from the registry's derivation"


def test_model_inputs_are_allowed_for_their_purpose_and_tier() -> None:
    for tier in fraud_tiers():
        registry_tier = "no_device_location" if tier == "request_only" else tier
        check_feature_service(FRAUD_PURPOSE, registry_tier, [f.name for f in tier_features(tier)])
    for tier in rec_tiers():
        check_feature_service(REC_PURPOSE, tier, tier_feature_names(tier))


def test_an_undeclared_or_forbidden_feature_is_refused() -> None:
    names = [f.name for f in tier_features("no_device_location")]
    with pytest.raises(PurposeViolation):
        check_feature_service(FRAUD_PURPOSE, "no_device_location", [*names, "mystery_feature"])
    device_feature = next(
        f.name for f in tier_features("full") if any(c.startswith("user.device") for c in f.categories)
    )
    with pytest.raises(PurposeViolation):
        check_feature_service(FRAUD_PURPOSE, "no_device_location", [*names, device_feature])
