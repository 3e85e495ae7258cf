"""Operations: /healthz, /readyz, /metrics, atomic model reload, OpenAPI examples."""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api_support import Api, World


pytest_plugins = ["api_support"]


def test_health_ready_and_metrics(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert set(ready.json()["models"]) == {
        "fraud-full",
        "fraud-no_device_location",
        "fraud-request_only",
        "recommender-personalized",
        "recommender-limited",
    }
    body = api.payment_body(api.adult_payments(1)[0])
    api.client.post("/v1/payments/score", json=body, headers=api.key("score"))
    text = api.client.get("/metrics").text
    assert (
        'aipic_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/payments/score"'
        in text
    )
    assert "aipic_decisions_total{" in text and 'purpose="fraud_detection"' in text
    assert 'aipic_model_version{model="fraud-full"' in text
    assert 'aipic_score_batch_size_bucket{le="1.0"} 1.0' in text  # one request: a batch of one


def test_not_ready_until_every_model_is_loaded(api_factory: Callable[..., Any]) -> None:
    names = ("recommender-personalized", "recommender-limited", "fraud-not-registered")
    with api_factory(model_names=names) as api:
        r = api.client.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        assert r.json()["missing_models"] == ["fraud-not-registered"]
        assert api.client.get("/healthz").status_code == 200
        body = api.payment_body(api.adult_payments(1)[0])
        r = api.client.post("/v1/payments/score", json=body, headers=api.key("score"))
        assert r.status_code == 503 and "not loaded" in r.json()["detail"]


def test_reload_picks_up_a_new_champion_atomically(
    world: World, tmp_path: Path, api_factory: Callable[..., Any]
) -> None:
    """Promote a new fraud version while requests run: none fails, then every answer uses it."""
    import mlflow
    import pandas as pd

    from training import registry

    db = tmp_path / "mlflow.db"
    shutil.copy(world.root / "mlflow.db", db)  # private registry: the shared one stays as it is
    with api_factory(mlflow_tracking_uri=f"sqlite:///{db}") as api:
        admin, scorer = api.key("admin"), api.key("score")
        served = api.services.models.current.get("fraud-no_device_location")
        before = served.version
        bundle = dataclasses.replace(served)  # log_bundle stamps the version on the object it logs
        body = api.payment_body(api.adult_payments(1)[0])
        registry.configure(api.settings)
        registry.ensure_experiment("serving-tests", api.settings)
        with mlflow.start_run():
            example = pd.DataFrame([[0.0] * len(bundle.feature_names)], columns=bundle.feature_names)
            new = registry.log_bundle(bundle, example)
        registry.set_champion(bundle.name, new)

        codes: list[int] = []
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                codes.append(api.client.post("/v1/payments/score", json=body, headers=scorer).status_code)

        worker = threading.Thread(target=hammer)
        worker.start()
        r = api.client.post("/v1/admin/models/reload", headers=admin)
        stop.set()
        worker.join()
        assert r.status_code == 200, r.text
        assert r.json()["changed"] == {"fraud-no_device_location": new} and new != before
        assert codes and set(codes) == {200}
        out = api.client.post("/v1/payments/score", json=body, headers=scorer).json()
        assert out["model"]["version"] == new
        assert served.version == before  # requests in flight kept their (unchanged) bundle
        assert api.client.post("/v1/admin/models/reload", headers=admin).json()["changed"] == {}
        assert api.client.post("/v1/admin/models/reload", headers=scorer).status_code == 403


def test_openapi_has_examples_and_security(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert schemas["PaymentIn"]["examples"] and schemas["RecommendationIn"]["examples"]
    assert {"APIKeyHeader", "HTTPBearer"} <= set(spec["components"]["securitySchemes"])
    paths = set(spec["paths"])
    for p in (
        "/v1/payments/score",
        "/v1/events",
        "/v1/recommendations",
        "/v1/decisions/{decision_id}/explanation",
        "/v1/decisions/{decision_id}/review",
        "/v1/reviews",
        "/v1/reviews/{review_id}/resolve",
        "/v1/me/consent",
        "/v1/me/export",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert p in paths
