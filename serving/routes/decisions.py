"""GET /v1/decisions/{id}/explanation and POST /v1/decisions/{id}/review.

Plain ``def`` handlers: FastAPI runs them in its thread pool, so their SQL (and a model load
from the registry) never blocks the event loop that scoring shares.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, status

from serving import explain
from serving.decisions import NotFound
from serving.deps import PersonCaller, PersonOrSupport, ServicesDep
from serving.modelset import ModelUnavailable
from serving.schemas import Explanation, ReviewIn, ReviewOut

router = APIRouter(prefix="/v1/decisions", tags=["decisions"])

DecisionId = Annotated[str, Path(pattern=r"^[0-9a-f-]{36}$", description="Decision id (UUID).")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such decision about you"}}


@router.get(
    "/{decision_id}/explanation",
    response_model=Explanation,
    summary="Explain a decision",
    description=(
        "The explanation owed under GDPR Arts 13-15 and 22: outcome and its consequences, whether solely "
        "automated, purpose and legal basis, the logic, up to four principal reasons with your own values "
        "(TreeSHAP on the exact logged input), data used and not used, what would change it, model version, "
        "a reproducibility check and your rights. A person sees only their own decisions (others: 404); "
        "support keys see all."
    ),
    responses=NOT_FOUND,
)
def explanation(decision_id: DecisionId, svc: ServicesDep, caller: PersonOrSupport) -> Explanation:
    try:
        decision = svc.decisions.get(decision_id, caller.subject)
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="decision not found") from None
    if decision["source"] == "human" and decision["supersedes"]:
        decision = svc.decisions.get(decision["supersedes"], caller.subject)
    bundle = None
    unavailable = None
    if decision["model_name"] and decision["model_version"]:
        try:
            bundle = svc.models.version(decision["model_name"], decision["model_version"])
        except ModelUnavailable as exc:
            unavailable = str(exc)
    return explain.build(
        decision,
        bundle,
        svc.registry,
        svc.feature_defs,
        svc.decisions.reviews_for_decision(decision["id"]),
        svc.decisions.superseded_by(decision["id"]),
        unavailable,
    )


@router.post(
    "/{decision_id}/review",
    response_model=ReviewOut,
    status_code=status.HTTP_201_CREATED,
    summary="Ask for human review, state your view, contest",
    description=(
        "Opens (or adds your statement to) a human review of your decision (Art 22(3)). Person token only."
    ),
    responses=NOT_FOUND,
)
def request_review(
    decision_id: DecisionId, body: ReviewIn, svc: ServicesDep, caller: PersonCaller
) -> ReviewOut:
    assert caller.subject is not None
    try:
        review = svc.decisions.request_review(decision_id, caller.subject, body.statement, origin="person")
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="decision not found") from None
    return ReviewOut(
        review_id=review["id"],
        decision_id=review["decision_id"],
        status=review["status"],
        origin=review["origin"],
        requested_at=review["requested_at"],
        statement=review["statement"],
    )
