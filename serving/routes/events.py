"""POST /v1/events: marketplace interactions that keep the real-time features fresh.

A plain ``def`` handler: the online-store write runs in FastAPI's thread pool, off the event loop.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from serving.deps import EventsCaller, ServicesDep
from serving.schemas import EventsIn, EventsOut

router = APIRouter(prefix="/v1", tags=["events"])


@router.post(
    "/events",
    response_model=EventsOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send interaction events",
    description=(
        "Views, likes, cart adds and purchases; applied to the online features before the answer. "
        "503 with Retry-After if the online store is unreachable (nothing applied: send again). Scope: `events`."
    ),
)
def events(body: EventsIn, svc: ServicesDep, _caller: EventsCaller) -> EventsOut:
    if svc.online is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="feature store not loaded yet")
    records = [
        {
            **e.model_dump(mode="python"),
            "ip": str(e.ip) if e.ip is not None else None,
            "event_type": e.event_type.value,
        }
        for e in body.events
    ]
    if not svc.online.update_interactions(records):
        svc.metrics.degraded.labels("events").inc()
        # not applied: tell the backend to send them again rather than lose them
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="online feature store unreachable: events not applied, retry later",
            headers={"Retry-After": str(max(1, int(svc.settings.online_retry_seconds)))},
        )
    return EventsOut(accepted=len(records), degraded=False)
