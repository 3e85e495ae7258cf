"""The gate: over random consent histories it never allows what purpose or consent forbids,
and a withdrawal, restriction or objection takes effect on the very next call."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from fideslang.default_taxonomy import DEFAULT_TAXONOMY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, event

from features.definitions import FeatureDef
from features.events import VALID_CONSENT, ConsentPurpose, ConsentStatus
from features.migrations import migrate
from features.privacy.gate import SubjectProfile, age_on, decide
from features.privacy.ledger import ConsentLedger
from features.privacy.registry import (
    FORBIDDEN_CATEGORIES,
    Registry,
    build_registry,
    is_personal,
    overlaps,
    within,
)
from features.settings import Settings

pytestmark = pytest.mark.consent

T0 = dt.datetime(2025, 6, 1, 9, 0, tzinfo=dt.UTC)
PURPOSES = ("fraud_detection", "personalised_recommendations", "limited_recommendations")
# One feature per fideslang category, plus a non-personal one: every category is put to the gate.
ALL_CATEGORY_FEATURES = [
    FeatureDef(f"f_{c.fides_key}", "user", c.fides_key, (c.fides_key,), "derived")
    for c in DEFAULT_TAXONOMY.data_category
] + [FeatureDef("item_popularity", "item", "non-personal", (), "derived")]


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> ConsentLedger:
    engine: Engine = create_engine(f"sqlite:///{tmp_path_factory.mktemp('gate') / 'gate.db'}")

    @event.listens_for(engine, "connect")
    def _no_fsync(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.execute("PRAGMA synchronous=OFF")  # test speed only: durability is not under test

    migrate(engine)
    return ConsentLedger(engine)


@dataclass
class Model:
    """An independent, obvious model of what the ledger should say."""

    consent: dict[str, str]
    restricted: bool = False
    objections: frozenset[str] = frozenset()

    def valid(self, purpose: ConsentPurpose) -> bool:
        return ConsentStatus(self.consent.get(purpose.value, "unknown")) in VALID_CONSENT


consent_event = st.tuples(
    st.just("consent"), st.sampled_from(list(ConsentPurpose)), st.sampled_from(list(ConsentStatus))
)
control_event = st.tuples(
    st.sampled_from(["restriction", "objection"]),
    st.sampled_from(["*", *PURPOSES]),
    st.booleans(),
)
history = st.lists(  # consent events twice as likely as controls: controls switch most checks off
    st.tuples(st.integers(min_value=0, max_value=3), st.one_of(consent_event, consent_event, control_event)),
    min_size=1,
    max_size=8,
)


def _check(
    reg: Registry,
    purpose: str,
    decision_tier: str | None,
    human: bool,
    model: Model,
    minor: bool,
    dob_known: bool,
    feats: list[FeatureDef],
) -> None:
    p = reg.purpose(purpose)
    objected = "*" in model.objections or purpose in model.objections
    for f in feats:
        for c in f.categories:
            assert not any(overlaps(c, x) for x in FORBIDDEN_CATEGORIES), (purpose, c)
            assert any(within(c, a) for a in p.allowed), (purpose, c)
            needed = reg.consent_for_category(purpose, c)
            if needed is not None:
                assert model.valid(needed), (purpose, c, needed, model)
            if minor or model.restricted or objected:
                assert not is_personal(c), (purpose, c)
    if purpose == "fraud_detection":
        blocked = minor or model.restricted or objected
        assert human == blocked
        assert (decision_tier is None) == blocked
        if not blocked:
            needs = reg.tier_consents("fraud_detection", "full")
            expected = "full" if all(model.valid(c) for c in needs) else "no_device_location"
            assert decision_tier == expected
    elif purpose == "personalised_recommendations":
        may_profile = (
            model.valid(ConsentPurpose.PERSONALISATION)
            and not minor
            and dob_known
            and not model.restricted
            and not objected
        )
        assert decision_tier == ("personalized" if may_profile else "limited")
        assert not human
    else:
        assert decision_tier == "limited" and not human


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    events=history,
    age=st.sampled_from([None, 12, 17, 18, 40, 40]),
    fraud_consent=st.sampled_from(["fraud_device_location_signals", None]),
)
def test_gate_never_exceeds_purpose_and_consent(
    ledger: ConsentLedger,
    events: list[tuple[int, tuple[str, object, object]]],
    age: int | None,
    fraud_consent: str | None,
) -> None:
    reg = build_registry(Settings(fraud_device_location_consent=fraud_consent))
    subject = f"s-{uuid.uuid4().hex[:10]}"
    dob = None if age is None else dt.date(T0.year - age, T0.month, T0.day) - dt.timedelta(days=1)
    profile = SubjectProfile(subject, dob)
    model = Model(consent={})
    controls: dict[tuple[str, str], bool] = {}
    now = T0
    for gap, ev in events:
        now = now + dt.timedelta(minutes=gap)
        kind = ev[0]
        if kind == "consent":
            purpose, status = ConsentPurpose(ev[1]), ConsentStatus(ev[2])
            ledger.append(subject, purpose, status, collection_method="test", event_time=now)
            model.consent[purpose.value] = status.value
        else:
            scope, active = str(ev[1]), bool(ev[2])
            scope = "*" if kind == "restriction" else scope
            ledger.record_control(
                subject, kind, active=active, scope=scope, collection_method="test", event_time=now
            )
            controls[(kind, scope)] = active
        model.restricted = any(a for (k, _), a in controls.items() if k == "restriction")
        model.objections = frozenset(s for (k, s), a in controls.items() if k == "objection" and a)
        minor = dob is not None and age_on(dob, now.date()) < 18
        for purpose_name in PURPOSES:  # the very next call after each event
            d = decide(subject, purpose_name, now, ledger, profile, registry=reg)
            feats = d.features(ALL_CATEGORY_FEATURES, registry=reg)
            _check(reg, purpose_name, d.tier, d.human_review, model, minor, dob is not None, feats)
            assert d.consent_snapshot["subject_id"] == subject


@pytest.mark.parametrize("status", list(ConsentStatus))
def test_only_given_and_renewed_count(ledger: ConsentLedger, status: ConsentStatus) -> None:
    subject = f"v-{uuid.uuid4().hex[:8]}"
    profile = SubjectProfile(subject, dt.date(1990, 1, 1))
    for purpose in (ConsentPurpose.PERSONALISATION, ConsentPurpose.DEVICE_LOCATION_SIGNALS):
        ledger.append(subject, purpose, status, collection_method="test", event_time=T0)
    rec = decide(subject, "personalised_recommendations", T0, ledger, profile)
    fraud = decide(subject, "fraud_detection", T0, ledger, profile)
    valid = status in {ConsentStatus.GIVEN, ConsentStatus.RENEWED}
    assert rec.tier == ("personalized" if valid else "limited")
    assert fraud.tier == ("full" if valid else "no_device_location")


def test_withdrawal_takes_effect_on_the_next_call(ledger: ConsentLedger) -> None:
    subject = f"w-{uuid.uuid4().hex[:8]}"
    profile = SubjectProfile(subject, dt.date(1990, 1, 1))
    ledger.append(subject, ConsentPurpose.PERSONALISATION, "given", collection_method="banner", event_time=T0)
    first = decide(subject, "personalised_recommendations", T0 + dt.timedelta(seconds=1), ledger, profile)
    assert first.tier == "personalized" and first.legal_basis == "A6-1-a"
    ledger.append(subject, ConsentPurpose.PERSONALISATION, "withdrawn", collection_method="settings_page")
    after = decide(subject, "personalised_recommendations", dt.datetime.now(dt.UTC), ledger, profile)
    assert after.tier == "limited" and after.legal_purpose == "limited_recommendations"
    assert after.legal_basis == "A6-1-f"
    assert not any(is_personal(c) for f in after.features(ALL_CATEGORY_FEATURES) for c in f.categories)
    assert after.consent_snapshot["consents"]["personalised_recommendations"]["status"] == "withdrawn"
    assert {r.code for r in after.reasons} == {"no_valid_consent"}
    assert "user.behavior" in after.excluded_categories


def test_fraud_routes_minors_restricted_and_objecting_people_to_review(ledger: ConsentLedger) -> None:
    now = T0 + dt.timedelta(hours=1)
    adult = SubjectProfile("a", dt.date(1980, 5, 5))
    ledger.append("a", ConsentPurpose.DEVICE_LOCATION_SIGNALS, "given", collection_method="x", event_time=T0)
    assert decide("a", "fraud_detection", now, ledger, adult).tier == "full"
    guest = decide("guest", "fraud_detection", now, ledger, None)
    assert (
        guest.tier == "no_device_location" and guest.automated
    )  # no consent: fewer signals, still automated
    assert set(guest.excluded_categories) == {"user.device", "user.location.imprecise"}

    minor = decide("kid", "fraud_detection", now, ledger, SubjectProfile("kid", dt.date(T0.year - 16, 1, 1)))
    assert minor.human_review and minor.tier is None and not minor.automated
    assert [r.code for r in minor.reasons] == ["minor"]

    ledger.record_control(
        "a", "objection", active=True, scope="fraud_detection", collection_method="x", event_time=now
    )
    objected = decide("a", "fraud_detection", now, ledger, adult)
    assert objected.human_review and objected.tier is None
    # the objection to fraud does not touch recommendations
    rec = decide("a", "personalised_recommendations", now, ledger, adult)
    assert rec.tier == "limited" and not rec.human_review  # no personalisation consent was given


def test_model_training_is_not_decided_per_request(ledger: ConsentLedger) -> None:
    from features.privacy.registry import RegistryError

    with pytest.raises(RegistryError, match="pit_consent"):
        decide("x", "model_training", T0, ledger)


def test_decision_log_record_is_json(ledger: ConsentLedger, tmp_path: Path) -> None:
    import json

    d = decide(
        "nobody", "personalised_recommendations", T0, ledger, SubjectProfile("nobody", dt.date(2000, 1, 1))
    )
    record = json.loads(json.dumps(d.to_log()))
    assert record["tier"] == "limited"
    assert record["consent"]["consents"]["personalised_recommendations"]["status"] == "unknown"
