"""The privacy registry: the one declarative source of truth for purpose limitation.

Each purpose declares its data use (fideslang key), legal basis (GDPR article and W3C DPV
key), the data categories it may use, which of them need which consent, its consent tiers
(richest first) and what an objection, a restriction or a minor does to it. Every model
input (`FeatureDef`) declares its categories; a tier's feature set is *derived* from those
declarations, never listed by hand, so adding a feature can never silently widen a purpose.

Category keys are hierarchical: an allowed key covers its descendants (``user.device``
covers ``user.device.ip_address``); a feature declaring a broader key than allowed is not
covered. Forbidden and dropped keys match in both directions (a feature declaring
``user.demographic`` might contain race or religion, so it is refused).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

from features.definitions import FeatureDef
from features.events import ConsentPurpose
from features.settings import Settings, get_settings


class RegistryError(ValueError):
    """The registry or a configuration value is inconsistent. The message says what."""


class PurposeViolation(ValueError):
    """A feature set uses a feature the purpose/tier does not allow or the registry does not know."""

    def __init__(self, purpose: str, tier: str, problems: Mapping[str, str]) -> None:
        self.purpose, self.tier, self.problems = purpose, tier, dict(problems)
        listed = "; ".join(f"{name}: {why}" for name, why in sorted(self.problems.items()))
        super().__init__(f"{purpose}/{tier} may not use: {listed}")


class Effect(StrEnum):
    """What objection, restriction or minority does to a purpose."""

    NONE = "none"  # processing continues unchanged
    NO_PROFILE_TIER = "no_profile_tier"  # fall back to the richest tier without personal categories
    HUMAN_REVIEW = "human_review"  # no automated decision: a person decides
    EXCLUDE = "exclude"  # the person's data is left out entirely


@dataclass(frozen=True)
class LegalBasis:
    """GDPR legal basis, with its W3C DPV key (``A6-1-x``) and concept."""

    dpv_key: str
    gdpr: str
    dpv_concept: str

    @property
    def label(self) -> str:
        return f"{self.gdpr} ({self.dpv_key}, {self.dpv_concept})"


CONSENT = LegalBasis("A6-1-a", "Art 6(1)(a) consent", "dpv:Consent")
CONTRACT = LegalBasis("A6-1-b", "Art 6(1)(b) contract", "dpv:Contract")
LEGAL_OBLIGATION = LegalBasis("A6-1-c", "Art 6(1)(c) legal obligation", "dpv:LegalObligation")
LEGITIMATE_INTEREST = LegalBasis("A6-1-f", "Art 6(1)(f) legitimate interest", "dpv:LegitimateInterest")


@dataclass(frozen=True)
class Tier:
    """One feature set of a purpose. ``drop`` removes categories from the purpose's allowed set.

    ``legal_purpose`` names the purpose whose legal basis covers the tier when it differs
    (the limited recommendation tier runs under ``limited_recommendations``, not consent).
    """

    name: str
    drop: tuple[str, ...] = ()
    legal_purpose: str | None = None
    description: str = ""


@dataclass(frozen=True)
class Purpose:
    """One processing purpose and everything the law and the policy say about it."""

    name: str
    description: str
    data_uses: tuple[str, ...]
    legal_basis: LegalBasis
    allowed: tuple[str, ...]
    consent_required: Mapping[str, ConsentPurpose]
    tiers: tuple[Tier, ...]
    on_objection: Effect
    on_restriction: Effect
    on_minor: Effect
    art22_ground: str | None = None
    trains: tuple[str, ...] = ()
    notes: str = ""

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise RegistryError(
            f"purpose {self.name!r} has no tier {name!r}; tiers: {[t.name for t in self.tiers]}"
        )


# --- category matching ---------------------------------------------------------------------


def within(category: str, key: str) -> bool:
    """True if ``category`` is ``key`` or one of its descendants."""
    return category == key or category.startswith(key + ".")


def overlaps(category: str, key: str) -> bool:
    """True if either key contains the other (could share data)."""
    return within(category, key) or within(key, category)


def is_personal(category: str) -> bool:
    return within(category, "user")


# --- the declarations ------------------------------------------------------------------------

FORBIDDEN_CATEGORIES: tuple[str, ...] = (
    "user.demographic.race_ethnicity",
    "user.demographic.religious_belief",
    "user.demographic.sexual_orientation",
    "user.demographic.political_opinion",
    "user.health_and_medical",
    "user.biometric",
    "user.authorization.biometric",
    "user.criminal_history",
    "user.childrens",
)
"""Special-category (Art 9/10) and children's data: never used by any purpose."""

CONSENT_SCOPES: Mapping[ConsentPurpose, tuple[str, ...]] = {
    ConsentPurpose.PERSONALISATION: (
        "user.behavior",
        "user.unique_id.pseudonymous",
        "user.demographic.language",
        "user.location.imprecise",
    ),
    ConsentPurpose.DEVICE_LOCATION_SIGNALS: ("user.device", "user.location.imprecise"),
    ConsentPurpose.MARKETING: ("user.behavior.purchase_history", "user.contact.email"),
}
"""The data categories a person agrees to when giving each consent (stored on every record)."""

DEVICE_LOCATION: tuple[str, ...] = ("user.device", "user.location")

FRAUD_ALLOWED: tuple[str, ...] = (
    "user.payment",
    "user.financial",
    "user.account",
    "user.unique_id.pseudonymous",
    "user.behavior.purchase_history",
    "user.behavior.browsing_history",
    "user.device",
    "user.location.imprecise",
    "user.contact.address.country",
    "system.operations",
)

PERSONALISATION_ALLOWED: tuple[str, ...] = (
    "user.behavior",
    "user.unique_id.pseudonymous",
    "user.demographic.language",
    "user.location.imprecise",
    "system.operations",
)


def _minimal_union(*groups: tuple[str, ...]) -> tuple[str, ...]:
    """Union of category lists without keys already covered by a broader one."""
    keys = list(dict.fromkeys(k for g in groups for k in g))
    return tuple(k for k in keys if not any(k != o and within(k, o) for o in keys))


def _purposes(device_location_consent: ConsentPurpose | None) -> tuple[Purpose, ...]:
    fraud_consent: dict[str, ConsentPurpose] = (
        {c: device_location_consent for c in DEVICE_LOCATION} if device_location_consent else {}
    )
    return (
        Purpose(
            name="fraud_detection",
            description="Score payments for fraud; decline, review or accept.",
            data_uses=("essential.fraud_detection",),
            legal_basis=LEGITIMATE_INTEREST,
            allowed=FRAUD_ALLOWED,
            consent_required=fraud_consent,
            tiers=(
                Tier("full", description="All fraud signals."),
                Tier(
                    "no_device_location",
                    drop=DEVICE_LOCATION,
                    description="Without device- and location-derived signals.",
                ),
            ),
            on_objection=Effect.HUMAN_REVIEW,
            on_restriction=Effect.HUMAN_REVIEW,
            on_minor=Effect.HUMAN_REVIEW,
            art22_ground="Art 22(2)(a): necessary for entering into the payment contract",
            notes="GDPR recital 47: fraud prevention is a legitimate interest; no consent needed.",
        ),
        Purpose(
            name="personalised_recommendations",
            description="Rank items from the person's own browsing and purchase profile.",
            data_uses=("personalize.content.profiling", "personalize.content.profiled"),
            legal_basis=CONSENT,
            allowed=PERSONALISATION_ALLOWED,
            consent_required={"user": ConsentPurpose.PERSONALISATION},
            tiers=(
                Tier("personalized", description="Profile-based ranking."),
                Tier(
                    "limited",
                    drop=("user",),
                    legal_purpose="limited_recommendations",
                    description="No personal data: popularity and item context only.",
                ),
            ),
            on_objection=Effect.NO_PROFILE_TIER,
            on_restriction=Effect.NO_PROFILE_TIER,
            on_minor=Effect.NO_PROFILE_TIER,
            notes="Consent can be withdrawn at any time (Art 7(3)); takes effect on the next request.",
        ),
        Purpose(
            name="limited_recommendations",
            description="Popular and trending items; no profile, no personal data.",
            data_uses=("personalize.content.limited",),
            legal_basis=LEGITIMATE_INTEREST,
            allowed=("system.operations",),
            consent_required={},
            tiers=(Tier("limited", description="No personal data."),),
            on_objection=Effect.NONE,
            on_restriction=Effect.NONE,
            on_minor=Effect.NONE,
        ),
        Purpose(
            name="model_training",
            description="Train the models of the purposes above on past events.",
            data_uses=("train_ai_system",),
            legal_basis=LEGITIMATE_INTEREST,
            allowed=_minimal_union(FRAUD_ALLOWED, PERSONALISATION_ALLOWED),
            consent_required={},
            tiers=(),
            on_objection=Effect.EXCLUDE,
            on_restriction=Effect.EXCLUDE,
            on_minor=Effect.EXCLUDE,
            trains=("fraud_detection", "personalised_recommendations", "limited_recommendations"),
            notes=(
                "Each model is trained for one purpose and tier: consent that tier needs must have "
                "been valid at each example's own time (point-in-time consent)."
            ),
        ),
    )


# --- the registry object ------------------------------------------------------------------------


@dataclass(frozen=True)
class Registry:
    """All purposes plus the global rules. Build it with `get_registry()`."""

    purposes: Mapping[str, Purpose]
    forbidden: tuple[str, ...] = FORBIDDEN_CATEGORIES
    consent_scopes: Mapping[ConsentPurpose, tuple[str, ...]] = field(default_factory=lambda: CONSENT_SCOPES)
    _verdicts: dict[tuple[str, str, str], str | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def purpose(self, name: str) -> Purpose:
        try:
            return self.purposes[name]
        except KeyError:
            raise RegistryError(f"unknown purpose {name!r}; known: {sorted(self.purposes)}") from None

    def tier_dropped(self, purpose: str, tier: str) -> tuple[str, ...]:
        return self.purpose(purpose).tier(tier).drop

    def category_allowed(self, purpose: str, tier: str, category: str) -> str | None:
        """None if ``category`` may be used by purpose/tier, else the reason it may not (memoised)."""
        key = (purpose, tier, category)
        if key not in self._verdicts:
            self._verdicts[key] = self._category_verdict(purpose, tier, category)
        return self._verdicts[key]

    def _category_verdict(self, purpose: str, tier: str, category: str) -> str | None:
        p = self.purpose(purpose)
        t = p.tier(tier)
        if any(overlaps(category, f) for f in self.forbidden):
            return f"category {category} is forbidden for every purpose"
        if not any(within(category, a) for a in p.allowed):
            return f"category {category} is not allowed for {purpose}"
        if any(overlaps(category, d) for d in t.drop):
            return f"category {category} is excluded from tier {tier}"
        return None

    def tier_consents(self, purpose: str, tier: str) -> frozenset[ConsentPurpose]:
        """The consents a tier needs: those of its consent-bound categories not dropped."""
        p = self.purpose(purpose)
        t = p.tier(tier)
        return frozenset(
            consent
            for category, consent in p.consent_required.items()
            if not any(within(category, d) for d in t.drop)
        )

    def consent_for_category(self, purpose: str, category: str) -> ConsentPurpose | None:
        """Which consent using ``category`` for ``purpose`` needs (None: no consent needed)."""
        for key, consent in self.purpose(purpose).consent_required.items():
            if overlaps(category, key):
                return consent
        return None

    def tier_is_personal(self, purpose: str, tier: str) -> bool:
        """Whether the tier may use any personal (``user.*``) category at all: that is profiling."""
        p = self.purpose(purpose)
        t = p.tier(tier)
        return any(is_personal(a) and not any(within(a, d) for d in t.drop) for a in p.allowed)

    def legal_purpose(self, purpose: str, tier: str) -> Purpose:
        t = self.purpose(purpose).tier(tier)
        return self.purpose(t.legal_purpose or purpose)

    def feature_problem(self, purpose: str, tier: str, feature: FeatureDef) -> str | None:
        """None if the feature may be used by purpose/tier, else why not.

        A feature declaring no category at all is declared non-personal (item aggregates,
        request context) and may be used by every tier.
        """
        for category in feature.categories:
            why = self.category_allowed(purpose, tier, category)
            if why:
                return why
        return None

    def allowed_features(self, purpose: str, tier: str, features: Iterable[FeatureDef]) -> list[FeatureDef]:
        """The features a tier may use, derived from their declared categories (order kept)."""
        return [f for f in features if self.feature_problem(purpose, tier, f) is None]

    def check_feature_service(
        self, purpose: str, tier: str, feature_names: Iterable[str], features: Sequence[FeatureDef]
    ) -> list[FeatureDef]:
        """Return the FeatureDefs of ``feature_names`` or raise PurposeViolation naming every problem."""
        declared = {f.name: f for f in features}
        problems: dict[str, str] = {}
        used: list[FeatureDef] = []
        for name in feature_names:
            short = name.split(":", 1)[-1]  # accept Feast "view:feature" references
            fdef = declared.get(short)
            if fdef is None:
                problems[name] = "not declared in the feature registry"
                continue
            why = self.feature_problem(purpose, tier, fdef)
            if why:
                problems[name] = why
            else:
                used.append(fdef)
        if problems:
            raise PurposeViolation(purpose, tier, problems)
        return used

    def all_keys(self) -> dict[str, set[str]]:
        """Every fideslang key the registry mentions, for validation against the taxonomy."""
        categories: set[str] = set(self.forbidden)
        uses: set[str] = set()
        for p in self.purposes.values():
            categories.update(p.allowed, p.consent_required)
            uses.update(p.data_uses)
            for t in p.tiers:
                categories.update(t.drop)
        for scope in self.consent_scopes.values():
            categories.update(scope)
        return {"data_category": categories, "data_use": uses}

    def validate(self) -> None:
        """Internal consistency; raises RegistryError with every problem found."""
        problems: list[str] = []
        for p in self.purposes.values():
            for a in p.allowed:
                bad = [f for f in self.forbidden if overlaps(a, f)]
                if bad:
                    problems.append(f"{p.name}: allowed {a} overlaps forbidden {bad}")
            for category, consent in p.consent_required.items():
                if not any(within(a, category) or within(category, a) for a in p.allowed):
                    problems.append(f"{p.name}: consent-bound {category} is not an allowed category")
                scope = self.consent_scopes.get(consent, ())
                covered = [a for a in p.allowed if within(a, category)]
                for a in covered:
                    if is_personal(a) and not any(within(a, s) or within(s, a) for s in scope):
                        problems.append(f"{p.name}: {a} needs consent {consent} whose scope lacks it")
            if not p.tiers and not p.trains:
                problems.append(f"{p.name}: no tiers")
            for t in p.tiers:
                if t.legal_purpose and t.legal_purpose not in self.purposes:
                    problems.append(f"{p.name}/{t.name}: unknown legal purpose {t.legal_purpose}")
            if p.legal_basis is CONSENT and not p.consent_required:
                problems.append(f"{p.name}: consent-based purpose names no consent")
            for target in p.trains:
                if target not in self.purposes:
                    problems.append(f"{p.name}: trains unknown purpose {target}")
        if problems:
            raise RegistryError("; ".join(problems))


def build_registry(settings: Settings) -> Registry:
    """Build and validate the registry for these settings (the fraud consent is configuration)."""
    return _registry_for(settings.fraud_device_location_consent or None)


@lru_cache(maxsize=8)
def _registry_for(raw: str | None) -> Registry:
    """One registry per configuration value: built and validated once, verdicts memoised."""
    consent: ConsentPurpose | None = None
    if raw:
        try:
            consent = ConsentPurpose(raw)
        except ValueError:
            raise RegistryError(
                f"AIPIC_FRAUD_DEVICE_LOCATION_CONSENT={raw!r} is not a consent purpose; "
                f"known: {[c.value for c in ConsentPurpose]} (or empty for none)"
            ) from None
    registry = Registry(purposes={p.name: p for p in _purposes(consent)})
    registry.validate()
    return registry


def get_registry() -> Registry:
    """The registry for the current settings (a changed setting gives the matching registry)."""
    return build_registry(get_settings())


def allowed_features(purpose: str, tier: str, features: Iterable[FeatureDef]) -> list[FeatureDef]:
    """The features purpose/tier may use, derived from their categories."""
    return get_registry().allowed_features(purpose, tier, features)


def check_feature_service(
    purpose: str, tier: str, feature_names: Iterable[str], features: Sequence[FeatureDef] | None = None
) -> list[FeatureDef]:
    """Raise PurposeViolation if any feature is undeclared or not allowed for purpose/tier."""
    return get_registry().check_feature_service(
        purpose, tier, feature_names, declared_features() if features is None else features
    )


def check_feast_services(
    services: Iterable[Any], features: Sequence[FeatureDef] | None = None, registry: Registry | None = None
) -> dict[str, list[FeatureDef]]:
    """Check Feast FeatureServices: each must carry ``purpose`` and ``tier`` tags and use only
    features that purpose/tier allows. Returns the FeatureDefs per service; raises PurposeViolation.
    """
    reg = registry or get_registry()
    feats = declared_features() if features is None else features
    out: dict[str, list[FeatureDef]] = {}
    for service in services:
        tags = dict(getattr(service, "tags", None) or {})
        purpose, tier = tags.get("purpose"), tags.get("tier")
        if not purpose or not tier:
            raise PurposeViolation(
                str(purpose), str(tier), {service.name: "FeatureService has no 'purpose' and 'tier' tags"}
            )
        names = [
            f"{proj.name_to_use()}:{field.name}"
            for proj in service.feature_view_projections
            for field in proj.features
        ]
        try:
            out[service.name] = reg.check_feature_service(purpose, tier, names, feats)
        except RegistryError as exc:
            raise PurposeViolation(purpose, tier, {service.name: str(exc)}) from None
    return out


def declared_features() -> list[FeatureDef]:
    """Every declared model input: ``ALL_FEATURES`` once assembled, else the per-model lists."""
    import importlib

    for module_name in ("features.definitions", "features.catalog", "features.all_features"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found = getattr(module, "ALL_FEATURES", None)
        if found is not None:
            return list(found)
    collected: list[FeatureDef] = []
    for module_name, attr in (
        ("features.payment_features", "PAYMENT_FEATURES"),
        ("features.rec_features", "REC_FEATURES"),
    ):
        try:
            collected += list(getattr(importlib.import_module(module_name), attr))
        except (ImportError, AttributeError):
            continue
    if not collected:
        raise RegistryError("no feature declarations found: pass the FeatureDefs explicitly")
    return collected


# --- the table printed into the README ------------------------------------------------------------


def _cell(items: Iterable[str]) -> str:
    listed = [f"`{i}`" for i in items]
    return "<br>".join(listed) if listed else "—"


def purposes_markdown(registry: Registry | None = None, features: Sequence[FeatureDef] | None = None) -> str:
    """Markdown tables: purposes × categories × legal basis (and, given features, tier sizes)."""
    reg = registry or get_registry()
    lines = [
        "| Purpose | Data use (fideslang) | Legal basis | Allowed categories | Consent needed "
        "| Tiers (richest first) | Objection | Restriction | Under 18 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in reg.purposes.values():
        consent = sorted({f"{c} → {k}" for k, c in p.consent_required.items()})
        consent_cell = _cell(consent) if consent else "none"
        if p.trains:
            consent_cell = "that of the trained tier, valid at each example's time"
            tiers = "per trained purpose: " + ", ".join(p.trains)
        else:
            parts = []
            for t in p.tiers:
                needs = sorted(c.value for c in reg.tier_consents(p.name, t.name))
                basis = reg.legal_purpose(p.name, t.name).legal_basis.dpv_key
                parts.append(f"`{t.name}` ({basis}; consent: {', '.join(needs) or 'none'})")
            tiers = "<br>".join(parts)
        lines.append(
            f"| `{p.name}` | {_cell(p.data_uses)} | {p.legal_basis.label} | {_cell(p.allowed)} "
            f"| {consent_cell} | {tiers} | {p.on_objection.value} "
            f"| {p.on_restriction.value} | {p.on_minor.value} |"
        )
    lines += [
        "",
        "Which consent the fraud device/location tier needs is configuration "
        "(`AIPIC_FRAUD_DEVICE_LOCATION_CONSENT`; empty means none).",
    ]
    lines += ["", f"Never used by any purpose: {', '.join(f'`{c}`' for c in reg.forbidden)}.", ""]
    lines.append("Consent purposes and the categories each covers:")
    lines.append("")
    for consent_purpose, scope in reg.consent_scopes.items():
        lines.append(f"- `{consent_purpose.value}`: {', '.join(f'`{c}`' for c in scope)}")
    if features is not None:
        lines += ["", "| Purpose | Tier | Features |", "|---|---|---|"]
        for p in reg.purposes.values():
            for t in p.tiers:
                names = [f.name for f in reg.allowed_features(p.name, t.name, features)]
                lines.append(f"| `{p.name}` | `{t.name}` | {len(names)}: {', '.join(names) or '—'} |")
    return "\n".join(lines) + "\n"
