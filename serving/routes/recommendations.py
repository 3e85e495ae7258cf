"""POST /v1/recommendations: ranked pictures with a reason each, personalised only with consent."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, HTTPException, status

from features.privacy.gate import GateDecision
from serving.decisions import json_floats, new_id
from serving.deps import RecommendCaller, ServicesDep
from serving.modelset import hash_of
from serving.recsys import RecommenderUnavailable
from serving.schemas import ModelRef, RecommendationIn, RecommendationOut, RecommendedItem
from serving.services import Services

router = APIRouter(prefix="/v1", tags=["recommendations"])

PURPOSE = "personalised_recommendations"


@router.post(
    "/recommendations",
    response_model=RecommendationOut,
    summary="Recommend pictures to a buyer",
    description=(
        "Personalised from the buyer's history only with valid consent, an adult declared age, and no "
        "restriction or objection; otherwise (and for unknown users) the limited tier, which uses no personal "
        "data. Every call is logged as a decision. Scope: `recommend`."
    ),
)
async def recommendations(
    body: RecommendationIn, svc: ServicesDep, _caller: RecommendCaller
) -> RecommendationOut:
    from models.recommend import RecommendError

    try:  # gate, ranking and the log's commit off the event loop, with the requests waiting alongside
        out, _row = await svc.recommending.submit(body)
    except RecommenderUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from None
    except RecommendError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    svc.metrics.decisions.labels(PURPOSE, "recommended", out.tier).inc()
    return out


Recommended = tuple[RecommendationOut, dict[str, Any]]


def decide_and_log_recommendations(
    svc: Services, bodies: list[RecommendationIn]
) -> list[Recommended | BaseException]:
    """Each request's recommendation (or the error it raised), then every row of the batch committed
    in one transaction before any answer leaves; if the commit fails, no request is answered.

    The batch's persons are gated together (`Services.gates`: one ledger read), as scoring batches are."""
    now = dt.datetime.now(dt.UTC)
    gates = svc.gates([b.user_id for b in bodies], PURPOSE, now)
    results: list[Recommended | BaseException] = []
    for body, gate in zip(bodies, gates, strict=True):
        try:
            results.append(decide_recommendation(svc, body, gate, now))
        except Exception as exc:
            results.append(exc)
    return svc.writer.log_batch(results, lambda r: (r[1], None))


def decide_recommendation(
    svc: Services, body: RecommendationIn, gate: GateDecision, now: dt.datetime
) -> tuple[RecommendationOut, dict[str, Any]]:
    """Gate's tier -> shared recommend function -> answer and the decision row to log."""
    from models.recommend import RecRequest

    allowed = gate.tier or "limited"
    snapshot = gate.to_log()
    # the person's state is built once, and in the limited tier their history is not read at all
    tier, state = svc.recommender.request_state(body.user_id, allowed, now)  # type: ignore[arg-type]
    if allowed == "personalized" and tier != allowed:  # consent, but no history yet: nothing to personalise
        snapshot["reasons"] = [*snapshot["reasons"], {"code": "no_history", "message": "No history yet."}]
    request = RecRequest(
        user_id=body.user_id,
        k=body.k,
        tier=tier,
        context_item_id=body.context.item_id,
        exclude_item_ids=frozenset(body.context.exclude_item_ids),
    )
    logged = svc.recommender.recommend_logged(request, now, state=state)
    decision_id = new_id()
    bundle = logged.bundle
    items = [
        RecommendedItem(item_id=r.item_id, rank=i + 1, score=r.score, source=r.source, reason=r.reason)
        for i, r in enumerate(logged.items)
    ]
    out = RecommendationOut(
        decision_id=decision_id,
        user_id=body.user_id,
        personalized=tier == "personalized",
        tier=tier,
        items=items,
        model=ModelRef(name=bundle.name, version=bundle.version),
        degraded=False,
    )
    row = {
        "id": decision_id,
        "subject_id": body.user_id,
        "kind": "recommendation",
        "reference_id": None,
        "purpose": PURPOSE,
        "tier": tier,
        "degraded": False,
        "model_name": bundle.name,
        "model_version": bundle.version,
        "model_hash": hash_of(bundle),
        "feature_names": logged.feature_names,
        "vectors": [json_floats(row) for row in logged.vectors.tolist()],
        "raw_scores": logged.raw_scores.tolist(),
        "probability": None,
        "thresholds": None,
        "outcome": "recommended",
        "source": "automated",
        "human_review_required": False,
        "consent_snapshot": snapshot,
        "output": out.model_dump(mode="json", exclude={"decision_id"}),
        "supersedes": None,
        "created_at": now,
    }
    return out, row
