"""Operations: health, readiness, metrics, model reload, and the benchmark's no-op ceiling."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, HTTPException, Response, status

from serving.deps import AdminCaller, ScoreCaller, ServicesDep
from serving.schemas import Health, PaymentIn, Readiness, ReloadOut

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Models and stores are loaded",
    responses={503: {"model": Readiness, "description": "Not ready yet (or lost a dependency)"}},
)
async def readyz(svc: ServicesDep, response: Response) -> Readiness:
    ready = svc.update_readiness()
    online_up = svc.online is not None and svc.online.up
    body = Readiness(
        ready=ready,
        models=svc.describe_models(),
        missing_models=svc.models.missing(),
        database=svc.database_ok,
        online_store=online_up,
        recommender=svc.recommender.ready,
        detail=svc.startup_error or svc.models.last_error,
    )
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return body


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(svc: ServicesDep) -> Response:
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post(
    "/v1/admin/models/reload",
    response_model=ReloadOut,
    summary="Pick up newly promoted champions now",
    description="Loads every champion whose version changed and swaps the model set atomically; requests "
    "in flight finish on the old set. Scope: `admin`.",
)
async def reload_models(svc: ServicesDep, _caller: AdminCaller) -> ReloadOut:
    try:
        changed = await anyio.to_thread.run_sync(svc.reload_models)
    except Exception as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"reload failed, current models kept: {type(exc).__name__}",
        ) from None
    return ReloadOut(changed=changed, models=svc.describe_models())


bench_router = APIRouter(tags=["operations"])


@bench_router.post(
    "/v1/bench/noop",
    summary="Benchmark ceiling: same auth and validation as scoring, no work",
    description="Only exposed with AIPIC_BENCH_NOOP_ENDPOINT=true.",
)
async def noop(payment: PaymentIn, _caller: ScoreCaller) -> dict[str, str]:
    return {"payment_id": payment.payment_id}
