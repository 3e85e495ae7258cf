"""POST /v1/payments/score."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from serving.deps import ScoreCaller, ServicesDep
from serving.modelset import ModelUnavailable
from serving.schemas import PaymentIn, ScoreOut
from serving.scoring import score_payment

router = APIRouter(prefix="/v1/payments", tags=["fraud"])


@router.post(
    "/score",
    response_model=ScoreOut,
    summary="Score a payment for fraud",
    description=(
        "Returns the calibrated fraud probability, a 0-99 risk score, the outcome (approve / review / "
        "decline), the feature tier used, up to four reasons, the model version and whether the answer "
        "was degraded. The payment also updates the real-time features. Scope: `score`."
    ),
    responses={
        401: {"description": "No or bad credentials"},
        403: {"description": "Missing scope `score`"},
        503: {
            "description": "Models not loaded, or the service's database unavailable (retry; see Retry-After)"
        },
    },
)
async def score(payment: PaymentIn, svc: ServicesDep, _caller: ScoreCaller) -> ScoreOut:
    try:
        return await score_payment(svc, payment)
    except ModelUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from None
