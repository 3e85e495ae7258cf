"""The purpose gate: which feature tier may be used for this person, for this purpose, now.

`decide` reads the ledger on every call (the person's state is never cached; only the
registry's fixed rules per purpose are derived once), so a withdrawal, restriction or
objection takes effect on the very next request. It returns the richest tier the person
allows, the reasons for every step down, the categories left out and why, and the consent
snapshot the decision log must keep. Minors (by declared date of birth) and restricted
people are never profiled: recommendations fall back to the tier without personal data; a
fraud decision about them, or about someone who objected, goes to human review.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from features.definitions import FeatureDef
from features.privacy.ledger import ConsentLedger, SubjectState
from features.privacy.registry import Effect, Purpose, Registry, RegistryError, Tier, get_registry, within
from features.privacy.sqltypes import as_utc
from features.settings import get_settings


@dataclass(frozen=True)
class SubjectProfile:
    """What the gate needs to know about the person besides the ledger."""

    subject_id: str
    date_of_birth: dt.date | None = None


@dataclass(frozen=True)
class Reason:
    """Why the gate stepped down or stopped: a stable code plus a plain-language message."""

    code: str
    message: str


@dataclass(frozen=True)
class GateDecision:
    subject_id: str
    purpose: str
    decided_at: dt.datetime
    tier: str | None
    legal_purpose: str | None
    legal_basis: str | None
    human_review: bool
    allowed_categories: tuple[str, ...]
    excluded_categories: dict[str, str]
    reasons: tuple[Reason, ...]
    consent_snapshot: dict[str, Any] = field(repr=False)

    @property
    def automated(self) -> bool:
        """Whether an automated decision may be taken at all."""
        return self.tier is not None and not self.human_review

    def features(self, features: Iterable[FeatureDef], registry: Registry | None = None) -> list[FeatureDef]:
        """The inputs this decision allows (empty if no tier)."""
        if self.tier is None:
            return []
        return (registry or get_registry()).allowed_features(self.purpose, self.tier, features)

    def to_log(self) -> dict[str, Any]:
        """JSON-ready record for the decision log and the explanation."""
        return {
            "subject_id": self.subject_id,
            "purpose": self.purpose,
            "decided_at": self.decided_at.isoformat(),
            "tier": self.tier,
            "legal_purpose": self.legal_purpose,
            "legal_basis": self.legal_basis,
            "human_review": self.human_review,
            "allowed_categories": list(self.allowed_categories),
            "excluded_categories": dict(self.excluded_categories),
            "reasons": [{"code": r.code, "message": r.message} for r in self.reasons],
            "consent": self.consent_snapshot,
        }


def age_on(date_of_birth: dt.date, day: dt.date) -> int:
    """Completed years on ``day``."""
    return day.year - date_of_birth.year - ((day.month, day.day) < (date_of_birth.month, date_of_birth.day))


def _blockers(
    purpose_name: str,
    effects: dict[str, Effect],
    state: SubjectState,
    profile: SubjectProfile | None,
    now: dt.datetime,
) -> list[tuple[Effect, Reason]]:
    out: list[tuple[Effect, Reason]] = []
    adult = get_settings().adult_age
    dob = profile.date_of_birth if profile else None
    if dob is not None and age_on(dob, now.date()) < adult:
        out.append((effects["minor"], Reason("minor", f"The person is under {adult}: never profiled.")))
    elif dob is None and effects["minor"] is Effect.NO_PROFILE_TIER:
        out.append(
            (
                Effect.NO_PROFILE_TIER,
                Reason("age_unknown", f"No declared date of birth: not shown to be {adult}+."),
            )
        )
    if state.restricted:
        out.append(
            (
                effects["restriction"],
                Reason("restricted", "Processing is restricted at the person's request (Art 18)."),
            )
        )
    if state.objects_to(purpose_name):
        out.append(
            (effects["objection"], Reason("objection", f"The person objected to {purpose_name} (Art 21)."))
        )
    return out


@dataclass(frozen=True)
class _TierPlan:
    """What the registry says about one tier: fixed for a registry, so derived once."""

    tier: Tier
    personal: bool
    consents: tuple[str, ...]  # consent purposes it needs, sorted
    allowed: tuple[str, ...]  # categories it may use
    dropped: tuple[str, ...]  # categories of the richest tier it leaves out
    legal_name: str
    legal_basis: str


@dataclass(frozen=True)
class _PurposePlan:
    purpose: Purpose
    effects: dict[str, Effect]
    tiers: tuple[_TierPlan, ...]
    richest_allowed: tuple[str, ...]


_PLANS: dict[tuple[int, str], tuple[Registry, _PurposePlan]] = {}


def _plan(reg: Registry, purpose: str) -> _PurposePlan:
    """The registry's answers for ``purpose``, computed once per registry object (it is frozen).

    Only the registry's static rules are kept here; the person's state is read on every call.
    """
    hit = _PLANS.get((id(reg), purpose))
    if hit is not None and hit[0] is reg:
        return hit[1]
    p = reg.purpose(purpose)
    if p.trains:
        raise RegistryError(f"{purpose} is decided per training example: use features.privacy.pit_consent")
    richest = p.tiers[0]
    richest_allowed = tuple(a for a in p.allowed if not any(within(a, d) for d in richest.drop))
    tiers = []
    for t in p.tiers:
        legal = reg.legal_purpose(purpose, t.name)
        tiers.append(
            _TierPlan(
                tier=t,
                personal=reg.tier_is_personal(purpose, t.name),
                consents=tuple(sorted(c.value for c in reg.tier_consents(purpose, t.name))),
                allowed=tuple(a for a in p.allowed if not any(within(a, d) for d in t.drop)),
                dropped=tuple(
                    a for a in richest_allowed if any(within(a, d) or within(d, a) for d in t.drop)
                ),
                legal_name=legal.name,
                legal_basis=legal.legal_basis.dpv_key,
            )
        )
    plan = _PurposePlan(
        purpose=p,
        effects={"minor": p.on_minor, "restriction": p.on_restriction, "objection": p.on_objection},
        tiers=tuple(tiers),
        richest_allowed=richest_allowed,
    )
    if len(_PLANS) > 64:
        _PLANS.clear()
    _PLANS[(id(reg), purpose)] = (reg, plan)
    return plan


def decide(
    subject_id: str,
    purpose: str,
    now: dt.datetime,
    ledger: ConsentLedger,
    profile: SubjectProfile | None = None,
    registry: Registry | None = None,
) -> GateDecision:
    """Pick the richest tier of ``purpose`` this person allows at ``now``; the ledger is read every time."""
    profiles = {subject_id: profile} if profile is not None else {}
    return decide_many([subject_id], purpose, now, ledger, profiles, registry)[0]


def decide_many(
    subject_ids: Sequence[str],
    purpose: str,
    now: dt.datetime,
    ledger: ConsentLedger,
    profiles: Mapping[str, SubjectProfile] | None = None,
    registry: Registry | None = None,
) -> list[GateDecision]:
    """`decide` for several persons at once: one ledger read for all (the API's request batches)."""
    plan = _plan(registry or get_registry(), purpose)
    when = as_utc(now)
    states = ledger.states(subject_ids, when)
    known = profiles or {}
    return [_decide(s, purpose, plan, states[s], known.get(s), when) for s in subject_ids]


def _decide(
    subject_id: str,
    purpose: str,
    plan: _PurposePlan,
    state: SubjectState,
    profile: SubjectProfile | None,
    when: dt.datetime,
) -> GateDecision:
    blockers = [
        (e, r) for e, r in _blockers(purpose, plan.effects, state, profile, when) if e is not Effect.NONE
    ]
    reasons = [r for _, r in blockers]
    stop = {e for e, _ in blockers} & {Effect.HUMAN_REVIEW, Effect.EXCLUDE}
    no_profile = any(e is Effect.NO_PROFILE_TIER for e, _ in blockers)

    chosen: _TierPlan | None = None
    skipped: list[str] = []  # why each richer tier was passed over, in order
    if not stop:
        for t in plan.tiers:
            if no_profile and t.personal:
                skipped.append("; ".join(r.code for r in reasons))
                continue
            missing = [c for c in t.consents if not state.consent(c).valid]
            if missing:
                detail = ", ".join(f"{c} ({state.consent(c).status.value})" for c in missing)
                reasons.append(
                    Reason("no_valid_consent", f"Tier {t.tier.name} needs valid consent: {detail}.")
                )
                skipped.append(f"no valid consent: {detail}")
                continue
            chosen = t
            break

    if chosen is None:
        allowed: tuple[str, ...] = ()
        stop_why = "; ".join(r.code for r in reasons) or "no tier allowed"
        excluded = dict.fromkeys(plan.richest_allowed, stop_why)
    else:
        allowed = chosen.allowed
        why = skipped[-1] if skipped else "not in tier"
        excluded = dict.fromkeys(chosen.dropped, why)
    return GateDecision(
        subject_id=subject_id,
        purpose=purpose,
        decided_at=when,
        tier=chosen.tier.name if chosen else None,
        legal_purpose=chosen.legal_name if chosen else None,
        legal_basis=chosen.legal_basis if chosen else None,
        human_review=Effect.HUMAN_REVIEW in stop,
        allowed_categories=allowed,
        excluded_categories=excluded,
        reasons=tuple(reasons),
        consent_snapshot=state.snapshot(),
    )
