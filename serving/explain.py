"""The explanation a person is owed for an automated decision (GDPR Arts 13-15 and 22).

Built from the decision log alone: the logged vector is re-scored with the logged model
version, the result must equal the logged raw score bit for bit, and the exact TreeSHAP
contributions (which sum to that raw score) give the principal reasons in plain language with
the person's own values. Purpose and legal basis come from the privacy registry, the categories
not used (and why) from the gate's record kept with the decision. For a fraud decline the
"what would change it" list names only actions a fraudster cannot take cheaply (verify
identity, use a card registered to you) - never a threshold or an amount to stay under.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from features.definitions import FeatureDef
from features.privacy.registry import Registry, RegistryError
from models.bundle import ModelBundle
from serving.modelset import hash_of
from serving.schemas import (
    CategoryUse,
    ExplainedReason,
    Explanation,
    ModelRef,
    ReproducibilityCheck,
    YourRights,
)

EXPLANATION_METHOD = (
    "Exact TreeSHAP feature contributions (LightGBM pred_contrib) computed on the exact input "
    "vector logged with the decision, by the logged model version; contributions are in log-odds "
    "and, with the base value, sum to the model's raw score."
)

SUPERVISORY_AUTHORITY = (
    "You can complain to the Bulgarian Commission for Personal Data Protection (CPDP, "
    "2 Prof. Tsvetan Lazarov Blvd., Sofia 1592, https://www.cpdp.bg) or to the data protection "
    "authority of the EU country where you live or work. You may also write to "
    "support@aipicmarket.net first."
)

OUTCOME_TEXT: dict[str, tuple[str, str]] = {
    "decline": (
        "The payment was refused because it was estimated to be very likely fraudulent.",
        "No money was taken and the pictures were not delivered. You can ask for a human to review "
        "the decision, and you can retry after verifying your identity.",
    ),
    "review": (
        "The payment is on hold until a member of staff checks it.",
        "Nothing is charged until the check is done; staff decide to accept or refuse it. "
        "You can add your view to the review.",
    ),
    "approve": (
        "The payment was accepted.",
        "The payment went through as normal.",
    ),
}

FRAUD_LOGIC = (
    "A gradient-boosted tree model (LightGBM, {trees} trees over {inputs} inputs) estimates the "
    "probability that this payment is fraudulent, i.e. not authorised by the card holder or part "
    "of an abuse pattern, from the payment itself and, where allowed, the history of the account, "
    "card, device and seller. The estimate is calibrated on later payments whose outcome is known. "
    "A probability of at least {review:.3f} sends the payment to a human reviewer; at least "
    "{decline:.3f} declines it. Your payment's estimated probability was {p:.3f} (risk score "
    "{risk} of 99), hence '{outcome}'."
)

REC_LOGIC = (
    "Candidate pictures are collected from {sources}; a ranking model (LightGBM lambdarank, "
    "{trees} trees over {inputs} inputs) orders them and business rules remove your own pictures, "
    "removed or flagged items, items you already own, and cap each creator at a few places. "
    "The {tier} tier was used: {tier_text}"
)

#: Counterfactuals by data category of the reasons: actions that do not help a fraudster.
SAFE_ACTIONS: tuple[tuple[str, str], ...] = (
    ("user.account", "Complete identity verification (KYC) in your account settings, then retry."),
    (
        "user.financial",
        "Pay with a card issued in your name and registered to your account (issued in the "
        "country of your billing address).",
    ),
    ("user.contact.address", "Make sure the billing address matches the one your card issuer has on record."),
    (
        "user.device",
        "Pay from a device you have used with your account before, or verify your identity first.",
    ),
    ("user.location", "Verify your identity first if you are paying while travelling."),
)
ALWAYS_ACTION = "Ask for a human review of this decision: a member of staff will look at it again."


def _within(category: str, key: str) -> bool:
    return category == key or category.startswith(key + ".")


def format_value(fdef: FeatureDef | None, value: float | None) -> str:
    """A person-readable rendering of one input value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not available"
    desc = fdef.description if fdef else ""
    if desc.startswith("1 if") or desc.startswith("1 for"):
        return "yes" if value >= 0.5 else "no"
    name = fdef.name if fdef else ""
    if ("amount" in name and "ratio" not in name and "zscore" not in name) or "price" in name:
        return f"{value:,.2f} EUR"
    if float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.3g}"


_UNITS = {"m": "minutes", "h": "hours", "d": "days"}
_WINDOW = re.compile(r"\b(\d+)([mhd])\b")
MAX_LISTED = 8


def plain(text: str) -> str:
    """Feature wording for people: "the 24h" -> "the 24 hours", "1h" -> "1 hour"."""

    def unit(m: re.Match[str]) -> str:
        n, u = m.group(1), _UNITS[m.group(2)]
        return f"{n} {u[:-1] if n == '1' else u}"

    return _WINDOW.sub(unit, text)


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown if len(names) <= MAX_LISTED else f"{shown} and {len(names) - MAX_LISTED} more"


def _statement(fdef: FeatureDef | None, name: str, value: float | None, effect: str, purpose: str) -> str:
    what = plain(fdef.description.rstrip(".")) if fdef else name
    target = "the estimated fraud risk" if purpose == "fraud_detection" else "the ranking of this picture"
    return f"{what}: yours was {format_value(fdef, value)}. This {effect} {target}."


@dataclass(frozen=True)
class Rescore:
    raw: np.ndarray  # one per logged row
    contributions: np.ndarray  # rows x (features + 1)


def rescore(
    bundle: ModelBundle, feature_names: Sequence[str], vectors: Sequence[Sequence[float | None]]
) -> Rescore:
    """Score the logged rows again with the logged model (same column order is checked)."""
    if list(feature_names) != list(bundle.feature_names):
        raise ValueError("the logged feature names differ from the model's inputs")
    x = np.array([[np.nan if v is None else float(v) for v in row] for row in vectors], dtype=np.float64)
    return Rescore(bundle.raw_score(x), bundle.contributions(x))


def principal_reasons(
    names: Sequence[str],
    values: Sequence[float | None],
    contributions: np.ndarray,
    defs: Mapping[str, FeatureDef],
    *,
    direction: int,
    purpose: str,
    limit: int = 4,
) -> list[ExplainedReason]:
    """Up to ``limit`` inputs that pushed the score most in ``direction`` (+1 up, -1 down)."""
    contrib = np.asarray(contributions[: len(names)], dtype=np.float64)
    order = np.argsort(-direction * contrib, kind="stable")
    out: list[ExplainedReason] = []
    for j in order[:limit]:
        c = float(contrib[j])
        if c * direction <= 0:
            break
        fdef = defs.get(names[j])
        effect = "raised" if c > 0 else "lowered"
        out.append(
            ExplainedReason(
                feature=names[j],
                statement=_statement(fdef, names[j], values[j], effect, purpose),
                your_value=values[j],
                effect=effect,  # type: ignore[arg-type]
                contribution=c,
                categories=list(fdef.categories) if fdef else [],
            )
        )
    return out


def categories_of(names: Sequence[str], defs: Mapping[str, FeatureDef]) -> dict[str, list[str]]:
    """Data category -> the inputs that carry it."""
    out: dict[str, list[str]] = {}
    for n in names:
        fdef = defs.get(n)
        for c in fdef.categories if fdef else ():
            out.setdefault(c, []).append(n)
    return out


def counterfactuals(reasons: Sequence[ExplainedReason]) -> list[str]:
    """Actions that would have changed a decline and that a fraudster cannot cheaply take."""
    actions: list[str] = []
    for reason in reasons:
        for key, action in SAFE_ACTIONS:
            if any(_within(c, key) for c in reason.categories) and action not in actions:
                actions.append(action)
    if not actions:
        actions.append(SAFE_ACTIONS[0][1])
    actions.append(ALWAYS_ACTION)
    return actions


def your_rights(decision_id: str) -> YourRights:
    return YourRights(
        human_review=f"POST /v1/decisions/{decision_id}/review with your statement: a member of staff "
        "re-examines the decision and can change it (Art 22(3)).",
        express_view_and_contest=f"The same request (POST /v1/decisions/{decision_id}/review) records "
        "your view and contests the decision; you get the review's id and can follow its status here.",
        object="POST /v1/me/objection (Art 21): for personalisation it stops at once; a fraud decision "
        "about you then always goes to a human.",
        withdraw_consent="PUT /v1/me/consent with status 'withdrawn' (Art 7(3)); effective on your next request.",
        access_and_portability="GET /v1/me/export returns your data, decisions and explanations as JSON (Arts 15, 20).",
        erasure="DELETE /v1/me (Art 17); a minimal record of the erasure is kept as proof.",
        complain=SUPERVISORY_AUTHORITY,
    )


def _purpose_text(registry: Registry, purpose: str, tier: str) -> tuple[str, str, str, str | None]:
    """(purpose name, description, legal basis label, Art 22 ground) from the registry."""
    try:
        legal = registry.legal_purpose(purpose, tier)
    except RegistryError:
        legal = registry.purpose(purpose)
    p = registry.purpose(purpose)
    return legal.name, legal.description, legal.legal_basis.label, p.art22_ground


def _not_used(
    registry: Registry,
    purpose: str,
    used: Mapping[str, list[str]],
    gate: Mapping[str, Any],
    degraded: bool,
) -> list[CategoryUse]:
    """Categories the purpose could use but this decision did not, with why; and the forbidden ones."""
    p = registry.purpose(purpose)
    excluded: Mapping[str, str] = gate.get("excluded_categories") or {}
    out: list[CategoryUse] = []
    for category in p.allowed:
        if category in used or any(_within(u, category) for u in used):
            continue
        if category in excluded:
            why = f"excluded for you: {excluded[category]}"
        elif degraded:
            why = "not available: the stored features were unreachable, only the request itself was used"
        else:
            why = "allowed for this purpose but not an input of this model"
        out.append(CategoryUse(category=category, why=why))
    for category in registry.forbidden:
        out.append(
            CategoryUse(
                category=category, why="never used for any purpose (special-category or children's data)"
            )
        )
    return out


def build(
    decision: Mapping[str, Any],
    bundle: ModelBundle | None,
    registry: Registry,
    defs: Mapping[str, FeatureDef],
    reviews: Sequence[Mapping[str, Any]],
    superseded_by: Mapping[str, Any] | None,
    unavailable_reason: str | None = None,
) -> Explanation:
    """The explanation of one logged decision."""
    purpose = str(decision["purpose"])
    tier = str(decision["tier"])
    names: list[str] = list(decision["feature_names"])
    vectors: list[list[float | None]] = [list(r) for r in decision["vectors"]]
    gate: Mapping[str, Any] = decision["consent_snapshot"] or {}
    outcome = str(decision["outcome"])
    kind = str(decision["kind"])
    decision_id = str(decision["id"])

    check: ReproducibilityCheck | None = None
    reasons: list[ExplainedReason] = []
    if bundle is not None and vectors:
        again = rescore(bundle, names, vectors)
        logged = np.asarray(decision["raw_scores"], dtype=np.float64)
        sums = again.contributions.sum(axis=1)
        check = ReproducibilityCheck(
            logged_raw_score=float(logged[0]),
            rescored_raw_score=float(again.raw[0]),
            identical=bool(np.array_equal(logged, again.raw)),
            contributions_sum=float(sums[0]),
            base_value=float(again.contributions[0, -1]),
            contributions_sum_matches=bool(np.all(np.abs(sums - again.raw) < 1e-9)),
            model_hash_matches=hash_of(bundle) == decision["model_hash"],
        )
        direction = -1 if outcome == "approve" else 1
        reasons = principal_reasons(
            names, vectors[0], again.contributions[0], defs, direction=direction, purpose=purpose
        )

    used = categories_of(names, defs)
    solely_automated = decision["source"] == "automated" and not decision["human_review_required"]
    if superseded_by is not None:
        solely_automated = False
    legal_name, legal_desc, legal_basis, art22 = _purpose_text(registry, purpose, tier)

    if kind == "payment_score":
        significance, consequences = OUTCOME_TEXT.get(outcome, (outcome, ""))
        thresholds = decision.get("thresholds") or {}
        p = decision.get("probability")
        if p is not None and bundle is not None:
            logic = FRAUD_LOGIC.format(
                trees=bundle.booster.num_trees(),
                inputs=len(names),
                review=float(thresholds.get("review", float("nan"))),
                decline=float(thresholds.get("decline", float("nan"))),
                p=float(p),
                risk=min(99, math.floor(100 * float(p))),
                outcome=outcome,
            )
        else:
            logic = (
                "No automated assessment was made: policy sends decisions about you to a human "
                "(restriction, objection or age), who decides from the payment details."
            )
        ground = art22 if solely_automated and outcome == "decline" else None
        changes = counterfactuals(reasons) if outcome == "decline" else []
    else:
        items = decision["output"].get("items", [])
        significance = f"{len(items)} pictures were chosen and ordered for you."
        consequences = (
            "Only the order and choice of pictures shown is affected; nothing is bought or refused. "
            "Each picture's reason is listed with it."
        )
        tier_text = (
            "your own browsing and purchase history was used, with your consent."
            if tier == "personalized"
            else "no personal data about you was used: popularity, trends and the picture on screen only."
        )
        logic = REC_LOGIC.format(
            sources="your history (with consent), the picture on screen, trends and new arrivals",
            trees=bundle.booster.num_trees() if bundle else 0,
            inputs=len(names),
            tier=tier,
            tier_text=tier_text,
        )
        ground = None
        changes = []
        art22 = None

    involvement = (
        "Decided by the model alone; you can ask a human to review it."
        if solely_automated
        else "A member of staff decides or has decided this (the model's estimate, if any, was only an input)."
    )
    if superseded_by is not None:
        involvement = (
            f"Reviewed by a member of staff on {superseded_by['created_at']:%Y-%m-%d}: outcome "
            f"'{superseded_by['outcome']}'."
        )
    if unavailable_reason:
        involvement += f" (The model version could not be loaded for re-checking: {unavailable_reason}.)"

    return Explanation(
        decision_id=decision_id,
        decided_at=decision["created_at"],
        kind=kind,
        outcome=outcome,
        significance=significance,
        consequences=consequences,
        solely_automated=solely_automated,
        art22_ground=ground,
        human_involvement=involvement,
        purpose=legal_name,
        purpose_description=legal_desc,
        legal_basis=legal_basis,
        logic=logic,
        principal_reasons=reasons,
        data_used=[CategoryUse(category=c, why=f"input of: {_listed(ns)}") for c, ns in sorted(used.items())],
        data_not_used=_not_used(registry, purpose, used, gate, bool(decision["degraded"])),
        what_would_change_it=changes,
        tier=tier,
        degraded=bool(decision["degraded"]),
        model=ModelRef(name=decision["model_name"] or "none", version=decision["model_version"] or "none"),
        model_hash=decision["model_hash"],
        explanation_method=EXPLANATION_METHOD,
        reproducibility=check,
        superseded_by_human=(
            {
                "decision_id": superseded_by["id"],
                "outcome": superseded_by["outcome"],
                "decided_at": superseded_by["created_at"].isoformat(),
            }
            if superseded_by
            else None
        ),
        reviews=[
            {
                "review_id": r["id"],
                "status": r["status"],
                "origin": r["origin"],
                "requested_at": r["requested_at"].isoformat(),
                "resolution": r["resolution"],
            }
            for r in reviews
        ],
        your_rights=your_rights(decision_id),
    )
