"""The FastAPI application factory. Nothing happens at import time.

``create_app(settings)`` wires routes, middleware and error handlers; the lifespan builds the
`Services` (database schema, models from the MLflow registry, online store, recommender
snapshot) in a worker thread. `/healthz` answers at once, `/readyz` turns true when every piece
is loaded, and a newly promoted champion is picked up by polling or `aipic models reload`.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.telemetry import TelemetryConfig
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from features.settings import Settings, get_settings
from serving.modelset import DEFAULT_MODELS, Loader
from serving.online import FeatureSource
from serving.services import Services

log = logging.getLogger("aipic.serving")

DESCRIPTION = """
Fraud scoring, recommendations and explanations for AIpicMarket.

**Authentication.** The marketplace backend sends `X-API-Key: aipic_<id>_<secret>` (scopes `score`,
`recommend`, `events`, `support`, `admin`; create one with `aipic auth create-key --scopes score,recommend`).
People send `Authorization: Bearer <JWT>` issued by the marketplace (development: `aipic auth issue-token
--subject USER_ID`) and only ever see their own decisions and data.

**Errors.** 401 missing/invalid credentials, 403 authenticated but not allowed, 404 not found (also for a
decision about someone else), 422 invalid input (the message names the field; also a body over the size
limit), 429 rate limit, 503 not ready.
"""


TELEMETRY_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Field, rule and message; never the offending input (it may carry card or personal data)."""
    out = []
    for err in exc.errors():
        out.append(
            {"loc": list(err.get("loc", ())), "msg": err.get("msg", "invalid"), "type": err.get("type")}
        )
    return out


def create_app(
    settings: Settings | None = None,
    *,
    model_names: Sequence[str] = DEFAULT_MODELS,
    feature_source: Callable[[Settings], FeatureSource] | None = None,
    engine: Engine | None = None,
    services: Services | None = None,
    model_loader: Loader | None = None,
) -> FastAPI:
    """Build the app. ``feature_source``, ``engine`` and ``model_loader`` override the configured ones.

    They exist for tests and benchmarks (a loader that memoises registry loads, an in-process store).
    """
    s = settings or get_settings()
    if services is None:
        from serving.services import serving_engine

        services = Services.create(
            s, engine or serving_engine(s), tuple(model_names), feature_source, model_loader
        )
    svc = services

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPI(
        title="aipic-ml",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's built-in OpenTelemetry hooks: off. Their logs would record validation failures
        # with the offending input (card and personal data), and the checks cost ~6 % of a scoring
        # request's CPU; the service exports its own Prometheus metrics (`serving.metrics`).
        telemetry=TELEMETRY_OFF,
    )
    app.state.services = svc

    from serving.middleware import GuardMiddleware
    from serving.routes import decisions, events, me, ops, payments, recommendations, reviews

    for router in (
        payments.router,
        events.router,
        recommendations.router,
        decisions.router,
        reviews.router,
        me.router,
        ops.router,
    ):
        app.include_router(router)
    if s.bench_noop_endpoint:
        app.include_router(ops.bench_router)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": _validation_errors(exc)})

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # FastAPI's "error parsing the body": malformed input is a 422 here
            return JSONResponse(
                status_code=422,
                content={
                    "detail": [
                        {"loc": ["body"], "msg": "body is not valid JSON (UTF-8)", "type": "json_invalid"}
                    ]
                },
            )
        return await http_exception_handler(request, exc)

    async def on_database_down(request: Request, exc: Exception) -> JSONResponse:
        """The service's database unreachable or busy (a dependency outage, not a bug): 503."""
        route = getattr(request.scope.get("route"), "path", "unmatched")
        cause = type(getattr(exc, "orig", None) or exc).__name__  # the type only: messages can quote values
        log.warning("database unavailable (%s) on %s %s", cause, request.method, route)
        return JSONResponse(
            status_code=503,
            headers={"Retry-After": "1"},
            content={
                "detail": "the service's database is unavailable: the request was not completed; retry shortly"
            },
        )

    app.add_exception_handler(OperationalError, on_database_down)
    app.add_exception_handler(InterfaceError, on_database_down)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        route = getattr(request.scope.get("route"), "path", "unmatched")
        # frames only: an exception's message can quote request values or SQL parameters
        frames = "".join(traceback.format_tb(exc.__traceback__)[-5:])
        log.error("unhandled %s on %s %s\n%s", type(exc).__name__, request.method, route, frames)
        return JSONResponse(status_code=500, content={"detail": "internal error"})

    app.add_middleware(GuardMiddleware, metrics=svc.metrics, max_body_bytes=s.max_body_bytes)
    return app
