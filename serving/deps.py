"""FastAPI dependencies: services, authentication, scopes, rate limits (all `Annotated`).

401 = no or bad credentials (with ``WWW-Authenticate``); 403 = authenticated but not allowed
(missing scope, a person calling a backend endpoint or the reverse); 429 = over the rate limit.
A person asking for someone else's decision gets 404 from the route, never its content.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import anyio
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from serving.auth import AuthError, Principal
from serving.services import Services

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Backend API key (scoped).")
bearer = HTTPBearer(auto_error=False, description="Person token (JWT) issued by the marketplace.")


async def get_services(request: Request) -> Services:
    """``async`` on purpose: FastAPI runs a plain ``def`` dependency in the thread pool (a hop per request)."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail=message,
        headers={"WWW-Authenticate": 'Bearer realm="aipic", ApiKey header="X-API-Key"'},
    )


async def authenticate(
    svc: ServicesDep,
    key: Annotated[str | None, Depends(api_key_header)],
    token: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller, from ``X-API-Key`` (backend) or ``Authorization: Bearer`` (person)."""
    try:
        if key:
            if svc.keys.needs_lookup(key):  # a database read: not on the event loop
                principal = await anyio.to_thread.run_sync(svc.keys.verify, key)
            else:
                principal = svc.keys.verify(key)
        elif token is not None and token.credentials:
            principal = svc.tokens.verify(token.credentials)
        else:
            raise _unauthorized("missing credentials: send X-API-Key or Authorization: Bearer <token>")
    except AuthError as exc:
        raise _unauthorized(str(exc)) from None
    verdict = svc.limiter.hit(principal.kind, principal.id)
    if not verdict.allowed:
        svc.metrics.rate_limited.inc()
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail="rate limit exceeded",
            headers={"Retry-After": str(verdict.retry_after)},
        )
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def require_scope(*scopes: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A backend key holding one of ``scopes`` (or admin)."""

    async def check(principal: PrincipalDep) -> Principal:
        if principal.kind != "key":
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, detail="this endpoint is for the marketplace backend"
            )
        if not any(principal.has(s) for s in scopes):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, detail=f"API key lacks the scope: {' or '.join(scopes)}"
            )
        return principal

    return check


async def require_person(principal: PrincipalDep) -> Principal:
    if principal.kind != "person":
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail="this endpoint takes a person token (Bearer JWT)"
        )
    return principal


async def person_or_support(principal: PrincipalDep) -> Principal:
    """A person (only their own data is visible) or a support/admin key."""
    if principal.kind == "key" and not principal.has("support"):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="API key lacks the scope: support")
    return principal


ScoreCaller = Annotated[Principal, Depends(require_scope("score"))]
RecommendCaller = Annotated[Principal, Depends(require_scope("recommend"))]
EventsCaller = Annotated[Principal, Depends(require_scope("events"))]
SupportCaller = Annotated[Principal, Depends(require_scope("support"))]
AdminCaller = Annotated[Principal, Depends(require_scope("admin"))]
PersonCaller = Annotated[Principal, Depends(require_person)]
PersonOrSupport = Annotated[Principal, Depends(person_or_support)]
