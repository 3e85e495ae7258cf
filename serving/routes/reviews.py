"""The review queue for support staff: GET /v1/reviews, POST /v1/reviews/{id}/resolve.

Plain ``def`` handlers: their SQL runs in FastAPI's thread pool, off the event loop.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, status

from serving.decisions import Conflict, NotFound
from serving.deps import ServicesDep, SupportCaller
from serving.schemas import ResolveIn, ReviewList, ReviewOut

router = APIRouter(prefix="/v1/reviews", tags=["reviews"])


def review_out(r: dict[str, Any]) -> ReviewOut:
    return ReviewOut(
        review_id=r["id"],
        decision_id=r["decision_id"],
        status=r["status"],
        origin=r["origin"],
        requested_at=r["requested_at"],
        statement=r["statement"],
        resolution=r["resolution"],
        reviewer=r["reviewer"],
        resolved_at=r["resolved_at"],
    )


@router.get("", response_model=ReviewList, summary="The review queue", description="Scope: `support`.")
def list_reviews(
    svc: ServicesDep,
    _caller: SupportCaller,
    state: Annotated[Literal["open", "resolved", "all"], Query(alias="status")] = "open",
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> ReviewList:
    rows = svc.decisions.reviews(None if state == "all" else state, limit=limit, offset=offset)
    return ReviewList(reviews=[review_out(r) for r in rows])


@router.post(
    "/{review_id}/resolve",
    response_model=ReviewOut,
    summary="Record a human outcome",
    description=(
        "Closes the review and records the reviewer's outcome as a new decision with source `human` that "
        "supersedes the automated one (which stays on record). Scope: `support`."
    ),
    responses={404: {"description": "No such review"}, 409: {"description": "Already resolved"}},
)
def resolve(
    review_id: Annotated[str, Path(pattern=r"^[0-9a-f-]{36}$")],
    body: ResolveIn,
    svc: ServicesDep,
    _caller: SupportCaller,
) -> ReviewOut:
    try:
        row = svc.decisions.resolve(review_id, body.reviewer, body.outcome, body.note)
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="review not found") from None
    except Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    return review_out(row)
