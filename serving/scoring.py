"""Scoring payments: gate -> features -> model -> outcome -> reasons -> log, for a batch of requests.

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
from dataclasses import dataclass
from typing import Any

import numpy as np

from features.privacy.gate import GateDecision
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
    """Decide and log (in a batch with the requests waiting alongside, see `serving.batching`),
    then answer.

    The decision's blocking round trips (consent ledger, online store) and its model call run in
    a worker thread, shared by every request of the batch: one ledger query, one Redis pipeline,
    one LightGBM call per model. The batch's decision-log commit (one transaction) runs in a thread
    of its own, while the worker decides the next batch.
    """
    out, _row, _review = await svc.scoring.submit(payment)
    svc.metrics.decisions.labels(PURPOSE, out.outcome, out.tier).inc()
    if out.degraded:
        svc.metrics.degraded.labels("score").inc()
        log.warning("decision %s degraded: tier %s (online store unavailable)", out.decision_id, out.tier)
    return out


Decided = tuple[ScoreOut, dict[str, Any], dict[str, Any] | None]


def log_payment_decisions(
    svc: Services, results: list[Decided | BaseException]
) -> list[Decided | BaseException]:
    """The second stage of a scoring batch (see `serving.batching`): every decision of the batch
    committed to the log in one transaction before any answer leaves. If the commit fails, no
    payment of the batch is answered (each request gets the error): an answer is never given for
    an unlogged decision."""
    return svc.writer.log_batch(results, lambda d: (d[1], d[2]))


@dataclass
class _Pending:
    """One payment on its way through `decide_payments`."""

    payment: PaymentIn
    record: dict[str, Any]
    gate: GateDecision
    human: bool
    bundle: ModelBundle | None = None
    values: dict[str, float | None] | None = None
    degraded: bool = False


def decide_payments(svc: Services, payments: list[PaymentIn]) -> list[Decided | BaseException]:
    """Gate, features, model, reasons for a batch; per payment the answer, the decision row and the
    review it opens (if any), or the exception that payment raised.

    Equal to deciding the payments one after the other in list order: the online store applies
    each payment after reading its vector, so a later payment of a card sees the earlier one.
    """
    now = dt.datetime.now(dt.UTC)
    models = svc.models.current
    gates = svc.gates([p.user_id for p in payments], PURPOSE, now)
    pending = []
    for payment, gate in zip(payments, gates, strict=True):
        human = gate.human_review or gate.tier is None
        item = _Pending(payment, payment_record(payment, now), gate, human)
        if not human:
            item.bundle = models.get(fraud_name(str(gate.tier)))
        pending.append(item)

    scored = [p for p in pending if p.bundle is not None]
    online = svc.online
    vectors = (
        online.score_payments([p.record for p in scored], [p.bundle.feature_names for p in scored])  # type: ignore[union-attr]
        if online is not None and scored
        else None
    )
    if vectors is not None:
        for p, v in zip(scored, vectors, strict=True):
            p.values = v
    else:  # the store is down: the request-only model, where the person's tier allows what it uses
        fallback = models.get(fraud_name(FRAUD_DEGRADED_TIER)) if scored else None
        for p in scored:
            p.degraded = True
            if fallback is not None and set(fallback.feature_names) <= _allowed_names(svc, str(p.gate.tier)):
                p.bundle = fallback
                p.values = online.request_vector(p.record) if online is not None else {}
            else:
                p.human, p.bundle = True, None  # the fallback would use what this tier excludes

    raws = _raw_scores([p for p in pending if p.bundle is not None and p.values is not None])
    out: list[Decided | BaseException] = []
    for p in pending:
        try:
            out.append(_decided(svc, p, raws.get(id(p)), now))
        except Exception as exc:
            out.append(exc)
    return out


def _raw_scores(items: list[_Pending]) -> dict[int, tuple[np.ndarray, float]]:
    """Each item's model input row and raw score: one LightGBM call per model for the batch (a
    row's score does not depend on the rows beside it)."""
    by_bundle: dict[int, list[_Pending]] = {}
    for p in items:
        by_bundle.setdefault(id(p.bundle), []).append(p)
    out: dict[int, tuple[np.ndarray, float]] = {}
    for group in by_bundle.values():
        bundle = group[0].bundle
        assert bundle is not None
        x = np.vstack([bundle.vector(p.values or {}) for p in group])
        raw = bundle.raw_score(x)
        for i, p in enumerate(group):
            out[id(p)] = (x[i : i + 1], float(raw[i]))
    return out


def _decided(
    svc: Services, p: _Pending, scored: tuple[np.ndarray, float] | None, now: dt.datetime
) -> Decided:
    payment, bundle, gate, degraded = p.payment, p.bundle, p.gate, p.degraded
    decision_id = new_id()
    reasons: list[ReasonCode] = []
    if bundle is not None and scored is not None:
        x, raw = scored
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
        bundle = None
        probability = None
        outcome = "review"
        tier = "none"
        row_vectors, raw_scores, names, thr = [], [], [], None
        model = ModelRef(name="none", version="none")
    human = bundle is None

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
        policy_review(decision_id, payment.user_id, "policy" if p.human else "model")
        if outcome == "review"
        else None
    )
    return out, row, review
