"""The privacy registry: valid fideslang keys, forbidden categories, tiers derived from categories."""

from __future__ import annotations

import pytest
from fideslang.default_taxonomy import DEFAULT_TAXONOMY
from typer.testing import CliRunner

from features.definitions import FeatureDef
from features.events import ConsentPurpose
from features.privacy.registry import (
    FORBIDDEN_CATEGORIES,
    PurposeViolation,
    RegistryError,
    build_registry,
    declared_features,
    get_registry,
    overlaps,
)
from features.settings import Settings

pytestmark = pytest.mark.consent

CATEGORY_KEYS = {c.fides_key for c in DEFAULT_TAXONOMY.data_category}
USE_KEYS = {u.fides_key for u in DEFAULT_TAXONOMY.data_use}

F = FeatureDef
SAMPLE = [
    F("amount", "request", "Amount.", ("user.payment",), "observed"),
    F("card_count_1h", "card", "Card velocity.", ("user.financial.credit_card", "user.payment"), "derived"),
    F("device_users", "device", "Users per device.", ("user.device.device_id",), "derived"),
    F(
        "ip_country_mismatch",
        "request",
        "IP vs billing.",
        ("user.location.imprecise", "user.device.ip_address"),
        "derived",
    ),
    F("user_views_30d", "user", "Views.", ("user.behavior.browsing_history",), "observed"),
    F("item_pop_7d", "item", "Popularity.", (), "derived"),
    F("item_price", "item", "Price.", ("system.operations",), "derived"),
    F("religion_guess", "user", "Must never be used.", ("user.demographic.religious_belief",), "derived"),
    F("vague_demo", "user", "Too broad: might contain race.", ("user.demographic",), "derived"),
    F("precise_gps", "user", "Precise location.", ("user.location.precise",), "observed"),
]


def names(features: list[FeatureDef]) -> list[str]:
    return [f.name for f in features]


def test_every_registry_key_exists_in_fideslang() -> None:
    keys = get_registry().all_keys()
    assert keys["data_category"] <= CATEGORY_KEYS, keys["data_category"] - CATEGORY_KEYS
    assert keys["data_use"] <= USE_KEYS, keys["data_use"] - USE_KEYS
    assert len(keys["data_category"]) > 15 and len(keys["data_use"]) >= 5


def test_legal_bases_are_dpv_gdpr_keys() -> None:
    reg = get_registry()
    for p in reg.purposes.values():
        assert p.legal_basis.dpv_key in {"A6-1-a", "A6-1-b", "A6-1-c", "A6-1-f"}
    assert reg.purpose("fraud_detection").legal_basis.dpv_key == "A6-1-f"
    assert reg.purpose("personalised_recommendations").legal_basis.dpv_key == "A6-1-a"


def test_forbidden_categories_never_allowed_anywhere() -> None:
    reg = get_registry()
    special = [c for c in CATEGORY_KEYS if any(overlaps(c, f) for f in FORBIDDEN_CATEGORIES)]
    assert "user.childrens" in special and "user.biometric.health" in special
    for p in reg.purposes.values():
        for t in p.tiers:
            for c in special:
                assert reg.category_allowed(p.name, t.name, c) is not None, (p.name, t.name, c)


def test_tiers_are_derived_from_categories() -> None:
    reg = get_registry()
    full = names(reg.allowed_features("fraud_detection", "full", SAMPLE))
    reduced = names(reg.allowed_features("fraud_detection", "no_device_location", SAMPLE))
    assert full == [
        "amount",
        "card_count_1h",
        "device_users",
        "ip_country_mismatch",
        "user_views_30d",
        "item_pop_7d",
        "item_price",
    ]
    assert reduced == ["amount", "card_count_1h", "user_views_30d", "item_pop_7d", "item_price"]
    personalized = reg.allowed_features("personalised_recommendations", "personalized", SAMPLE)
    assert names(personalized) == ["user_views_30d", "item_pop_7d", "item_price"]
    assert names(reg.allowed_features("personalised_recommendations", "limited", SAMPLE)) == [
        "item_pop_7d",
        "item_price",
    ]


def test_check_feature_service_names_every_problem() -> None:
    reg = get_registry()
    assert names(
        reg.check_feature_service("fraud_detection", "full", ["amount", "view:card_count_1h"], SAMPLE)
    ) == [
        "amount",
        "card_count_1h",
    ]
    with pytest.raises(PurposeViolation) as err:
        reg.check_feature_service(
            "fraud_detection",
            "no_device_location",
            ["amount", "device_users", "religion_guess", "ghost"],
            SAMPLE,
        )
    assert set(err.value.problems) == {"device_users", "religion_guess", "ghost"}
    assert "not declared" in err.value.problems["ghost"]
    assert "forbidden" in err.value.problems["religion_guess"]
    assert "excluded from tier" in err.value.problems["device_users"]
    for bad in ("vague_demo", "precise_gps"):
        with pytest.raises(PurposeViolation):
            reg.check_feature_service("personalised_recommendations", "personalized", [bad], SAMPLE)


def test_tier_consents_follow_configuration() -> None:
    default = build_registry(Settings())
    assert default.tier_consents("fraud_detection", "full") == {ConsentPurpose.DEVICE_LOCATION_SIGNALS}
    assert default.tier_consents("fraud_detection", "no_device_location") == frozenset()
    assert default.tier_consents("personalised_recommendations", "personalized") == {
        ConsentPurpose.PERSONALISATION
    }
    assert default.tier_consents("personalised_recommendations", "limited") == frozenset()
    assert not default.tier_is_personal("personalised_recommendations", "limited")
    none_needed = build_registry(Settings(fraud_device_location_consent=None))
    assert none_needed.tier_consents("fraud_detection", "full") == frozenset()
    with pytest.raises(RegistryError, match="not a consent purpose"):
        build_registry(Settings(fraud_device_location_consent="whatever"))
    # a consent whose scope does not cover device data cannot be configured for it
    with pytest.raises(RegistryError, match="scope"):
        build_registry(Settings(fraud_device_location_consent="marketing"))


def test_unknown_purpose_or_tier_is_a_clear_error() -> None:
    reg = get_registry()
    with pytest.raises(RegistryError, match="unknown purpose"):
        reg.purpose("advertising")
    with pytest.raises(RegistryError, match="no tier"):
        reg.allowed_features("fraud_detection", "gold", SAMPLE)


def test_declared_features_obey_the_registry() -> None:
    """Every real FeatureDef uses known fideslang keys, none forbidden, names unique."""
    try:
        feats = declared_features()
    except RegistryError:
        pytest.skip("no FeatureDef lists written yet")
    assert len({f.name for f in feats}) == len(feats)
    for f in feats:
        assert set(f.categories) <= CATEGORY_KEYS, (f.name, f.categories)
        assert not any(overlaps(c, x) for c in f.categories for x in FORBIDDEN_CATEGORIES), f.name
    reg = get_registry()
    personal = [f for f in feats if f.categories]
    limited = reg.allowed_features("personalised_recommendations", "limited", feats)
    assert not any(f.categories for f in limited)
    assert len(limited) < len(feats) and personal


def test_real_payment_tiers_drop_device_and_location() -> None:
    pf = pytest.importorskip("features.payment_features")
    reg = get_registry()
    full = reg.allowed_features("fraud_detection", "full", pf.PAYMENT_FEATURES)
    reduced = reg.allowed_features("fraud_detection", "no_device_location", pf.PAYMENT_FEATURES)
    assert names(full) == names(pf.PAYMENT_FEATURES)  # every fraud input is allowed for fraud
    assert 0 < len(reduced) < len(full)
    assert not any(c.startswith(("user.device", "user.location")) for f in reduced for c in f.categories)


def test_purposes_command_prints_the_table() -> None:
    from serving.cli import app

    result = CliRunner().invoke(app, ["privacy", "purposes"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("| Purpose | Data use (fideslang) | Legal basis |")
    rows = {line.split("|")[1].strip(" `") for line in lines if line.startswith("| `")}
    assert rows == set(get_registry().purposes)
    assert "A6-1-f" in result.output and "A6-1-a" in result.output
    assert "`user.demographic.race_ethnicity`" in result.output


def test_feast_feature_services_are_checked() -> None:
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64

    from features.privacy.registry import check_feast_services

    src = FileSource(path="unused.parquet", timestamp_field="ts")
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
    view = FeatureView(
        name="pay",
        entities=[user],
        schema=[Field(name=n, dtype=Float64) for n in ("amount", "device_users", "card_count_1h")],
        source=src,
    )
    tags = {"purpose": "fraud_detection", "tier": "no_device_location"}
    ok = FeatureService(name="fraud_reduced", features=[view[["amount", "card_count_1h"]]], tags=tags)
    leaky = FeatureService(name="fraud_reduced_leaky", features=[view], tags=tags)
    untagged = FeatureService(name="untagged", features=[view[["amount"]]])
    assert names(check_feast_services([ok], SAMPLE)["fraud_reduced"]) == ["amount", "card_count_1h"]
    with pytest.raises(PurposeViolation) as err:
        check_feast_services([ok, leaky], SAMPLE)
    assert set(err.value.problems) == {"pay:device_users"}
    with pytest.raises(PurposeViolation, match="tags"):
        check_feast_services([untagged], SAMPLE)
