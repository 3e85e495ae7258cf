"""Scoring one payment: gate -> features -> model -> outcome -> reasons -> log.

The gate (`features.privacy.gate.decide`, read fresh from the ledger) picks the richest fraud
tier the person allows or sends the decision to a human (minor, restriction, objection). The
online store gives the stored features; if it is down the request-only model answers with
``degraded: true``, provided that model uses nothing the person's tier excludes (else a human
decides). The exact vector, consent snapshot and model identity go to the decision log before
the answer leaves.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Any

import numpy as np

from features.privacy.gate import decide
from models.bundle import ModelBundle
from serving.decisions import json_floats, new_id, policy_review
from serving.modelset import FRAUD_DEGRADED_TIER, fraud_name, hash_of
from serving.schemas import CURRENCY_TO_EUR, ModelRef, PaymentIn, ReasonCode, ScoreOut
from serving.services import Services

log = logging.getLogger("aipic.serving.score")

PURPOSE = "fraud_detection"


def payment_record(payment: PaymentIn, now: dt.datetime) -> dict[str, Any]:
    """The payment as the feature pipeline expects it (amount in EUR, times in UTC)."""
    rate = CURRENCY_TO_EUR[payment.currency.value]
    return {
        "payment_id": payment.payment_id,
        "user_id": payment.user_id,
        "item_ids": list(payment.item_ids),
        "payment_time": payment.payment_time or now,
        "kind": "purchase",
        "amount": round(payment.amount * rate, 2),
        "currency": "EUR",
        "card_fingerprint": payment.card_fingerprint,
        "card_bin_country": payment.card_bin_country,
        "billing_country": payment.billing_country,
        "device_id": payment.device_id,
        "ip": str(payment.ip) if payment.ip is not None else None,
        "ip_country": payment.ip_country,
        "creator_id": payment.creator_id,
    }


def reason_codes(bundle: ModelBundle, x: np.ndarray, svc: Services, limit: int = 4) -> list[ReasonCode]:
    """Inputs that raised the risk most (exact TreeSHAP on this vector)."""
    contrib = bundle.contributions(x)[0, :-1]
    order = np.argsort(-contrib, kind="stable")[:limit]
    out = []
    for j in order:
        c = float(contrib[j])
        if c <= 0:
            break
        name = bundle.feature_names[j]
        fdef = svc.feature_defs.get(name)
        value = float(x[0, j])
        out.append(
            ReasonCode(
                code=name,
                description=fdef.description if fdef else name,
                value=None if math.isnan(value) else value,
                effect="raises_risk",
                weight=c,
            )
        )
    return out


def _allowed_names(svc: Services, tier: str) -> set[str]:
    defs = list(svc.feature_defs.values())
    return {f.name for f in svc.registry.allowed_features(PURPOSE, tier, defs)}


async def score_payment(svc: Services, payment: PaymentIn) -> ScoreOut:
    """Decide in a worker thread (one hop for the whole decision), then log (group commit) and answer.

    The decision makes several blocking round trips (consent ledger, online store reads and the
    real-time update): in a thread they overlap across requests instead of stalling the event
    loop, which measured about twice the throughput of running them inline.
    """
    out, row, review = await svc.run_decision(decide_payment, svc, payment)
    await svc.writer.write(row, review)
    svc.metrics.decisions.labels(PURPOSE, out.outcome, out.tier).inc()
    if out.degraded:
        svc.metrics.degraded.labels("score").inc()
        log.warning("decision %s degraded: tier %s (online store unavailable)", out.decision_id, out.tier)
    return out


def decide_payment(
    svc: Services, payment: PaymentIn
) -> tuple[ScoreOut, dict[str, Any], dict[str, Any] | None]:
    """Gate, features, model, reasons; the decision row and the review it opens (if any)."""
    now = dt.datetime.now(dt.UTC)
    record = payment_record(payment, now)
    gate = decide(
        payment.user_id, PURPOSE, now, svc.ledger, svc.profiles.profile(payment.user_id), svc.registry
    )
    models = svc.models.current
    degraded = False
    bundle: ModelBundle | None = None
    values: dict[str, float | None] | None = None
    human = gate.human_review or gate.tier is None

    if not human:
        assert gate.tier is not None
        bundle = models.get(fraud_name(gate.tier))
        online = svc.online
        values = online.payment_vector(record, bundle.feature_names) if online is not None else None
        if values is None:
            degraded = True
            bundle = models.get(fraud_name(FRAUD_DEGRADED_TIER))
            if not set(bundle.feature_names) <= _allowed_names(svc, gate.tier):
                human = True  # the fallback model would use what this person's tier excludes
                bundle = None
            else:
                values = online.request_vector(record) if online is not None else {}
        if online is not None and not degraded and not online.update_payment(record):
            degraded = True

    decision_id = new_id()
    reasons: list[ReasonCode] = []
    if bundle is not None and values is not None:
        x = bundle.vector(values)
        raw = float(bundle.raw_score(x)[0])
        probability = float(bundle.probability(np.array([raw]))[0])
        thresholds = bundle.thresholds
        outcome = (
            thresholds.outcome(probability)
            if thresholds
            else ("decline" if probability >= 0.5 else "approve")
        )
        if outcome != "approve":
            reasons = reason_codes(bundle, x, svc)
        tier = bundle.tier if degraded else str(gate.tier)
        row_vectors = [json_floats(x[0].tolist())]
        raw_scores = [raw]
        names = list(bundle.feature_names)
        model = ModelRef(name=bundle.name, version=bundle.version)
        thr = {"review": thresholds.review, "decline": thresholds.decline} if thresholds else None
    else:
        probability = None
        outcome = "review"
        tier = "none"
        row_vectors, raw_scores, names, thr = [], [], [], None
        model = ModelRef(name="none", version="none")

    out = ScoreOut(
        decision_id=decision_id,
        payment_id=payment.payment_id,
        fraud_probability=probability,
        risk_score=None if probability is None else min(99, math.floor(100 * probability)),
        outcome=outcome,  # type: ignore[arg-type]
        tier=tier,
        human_review=human,
        reasons=reasons,
        model=model,
        degraded=degraded,
    )
    row = {
        "id": decision_id,
        "subject_id": payment.user_id,
        "kind": "payment_score",
        "reference_id": payment.payment_id,
        "purpose": PURPOSE,
        "tier": tier,
        "degraded": degraded,
        "model_name": bundle.name if bundle else None,
        "model_version": bundle.version if bundle else None,
        "model_hash": hash_of(bundle) if bundle else None,
        "feature_names": names,
        "vectors": row_vectors,
        "raw_scores": raw_scores,
        "probability": probability,
        "thresholds": thr,
        "outcome": outcome,
        "source": "automated",
        "human_review_required": human,
        "consent_snapshot": gate.to_log(),
        "output": out.model_dump(mode="json", exclude={"decision_id"}),
        "supersedes": None,
        "created_at": now,
    }
    review = (
        policy_review(decision_id, payment.user_id, "policy" if human else "model")
        if outcome == "review"
        else None
    )
    return out, row, review
