"""POST /v1/payments/score and POST /v1/events: happy path, tiers, degradation, bad input."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from features.events import ConsentPurpose

if TYPE_CHECKING:
    from api_support import Api


pytest_plugins = ["api_support"]


def test_score_happy_path_logs_the_exact_vector(api: Api) -> None:
    headers = api.key("score")
    bodies = [api.payment_body(p) for p in api.world.frame["payment_id"].head(40)]
    outs = []
    for body in bodies:
        r = api.client.post("/v1/payments/score", json=body, headers=headers)
        assert r.status_code == 200, r.text
        outs.append(r.json())
    for out, body in zip(outs, bodies, strict=True):
        assert out["payment_id"] == body["payment_id"]
        assert out["outcome"] in {"approve", "review", "decline"}
        assert out["degraded"] is False
        if out["fraud_probability"] is not None:
            assert 0 <= out["fraud_probability"] <= 1
            assert out["risk_score"] == min(99, int(np.floor(100 * out["fraud_probability"])))
            assert out["model"]["name"] == f"fraud-{out['tier']}"
        assert len(out["reasons"]) <= 4
    # the logged row has the vector the model saw and reproduces the raw score
    svc = api.services
    scored = [o for o in outs if o["fraud_probability"] is not None]
    assert scored, "every test payment went to a human: the fixture lost its consent mix"
    row = svc.decisions.get(scored[0]["decision_id"])
    bundle = svc.models.version(row["model_name"], row["model_version"])
    x = np.array([[np.nan if v is None else v for v in row["vectors"][0]]])
    assert row["feature_names"] == bundle.feature_names
    assert float(bundle.raw_score(x)[0]) == row["raw_scores"][0]
    assert row["consent_snapshot"]["purpose"] == "fraud_detection"
    assert len(api.source.updates) == len([o for o in outs if o["fraud_probability"] is not None])


def test_tier_follows_consent_and_restriction_goes_to_a_human(api: Api) -> None:
    headers = api.key("score", "support")
    body = api.payment_body(api.adult_payments()[0])
    user = body["user_id"]
    ledger = api.services.ledger
    ledger.append(user, ConsentPurpose.DEVICE_LOCATION_SIGNALS, "given", collection_method="test")
    full = api.client.post("/v1/payments/score", json=body, headers=headers).json()
    ledger.append(user, ConsentPurpose.DEVICE_LOCATION_SIGNALS, "withdrawn", collection_method="test")
    reduced = api.client.post("/v1/payments/score", json=body, headers=headers).json()
    assert (full["tier"], reduced["tier"]) == ("full", "no_device_location")
    row = api.services.decisions.get(reduced["decision_id"])
    assert not any(n.startswith(("device_", "ip_")) for n in row["feature_names"])

    ledger.record_control(user, "restriction", active=True, collection_method="test")
    held = api.client.post("/v1/payments/score", json=body, headers=headers).json()
    assert held["outcome"] == "review" and held["human_review"] is True and held["fraud_probability"] is None
    queue = api.client.get("/v1/reviews", headers=headers).json()["reviews"]
    assert any(r["decision_id"] == held["decision_id"] and r["origin"] == "policy" for r in queue)


def test_degraded_when_the_online_store_is_down_and_recovers(api_factory: Callable[..., Any]) -> None:
    with api_factory(online_retry_seconds=1.5) as api:
        headers = api.key("score")
        body = api.payment_body(str(api.world.frame["payment_id"].iloc[5]))
        api.source.down = True
        first = api.client.post("/v1/payments/score", json=body, headers=headers).json()
        second = api.client.post("/v1/payments/score", json=body, headers=headers).json()
        for out in (first, second):
            if out["fraud_probability"] is not None:  # not a policy-routed person
                assert out["degraded"] is True and out["tier"] == "request_only"
                assert out["model"]["name"] == "fraud-request_only"
        assert api.client.get("/readyz").json()["online_store"] is False
        metrics = api.client.get("/metrics").text
        assert 'aipic_degraded_total{endpoint="score"}' in metrics
        api.source.down = False
        time.sleep(1.6)
        back = api.client.post("/v1/payments/score", json=body, headers=headers).json()
        assert back["degraded"] is False
        assert api.client.get("/readyz").json()["online_store"] is True


BAD_INPUTS = {
    "negative amount": {"amount": -1},
    "huge amount": {"amount": 1e12},
    "amount as string": {"amount": "12.5"},
    "amount as bool": {"amount": True},
    "unknown currency": {"currency": "XYZ"},
    "lowercase country": {"ip_country": "bg"},
    "junk unicode id": {"user_id": "u\u202e\u0000x"},
    "emoji id": {"payment_id": "p-\U0001f4a5"},
    "no items": {"item_ids": []},
    "too many items": {"item_ids": [f"i-{i}" for i in range(51)]},
    "bad ip": {"ip": "999.1.1.1"},
    "naive time": {"payment_time": "2026-01-05T10:00:00"},
    "future time": {"payment_time": "2099-01-01T00:00:00Z"},
    "unknown field": {"fraud_pattern": "none"},
    "id too long": {"payment_id": "p" * 200},
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_422_with_the_field_named(shared_api: Api, case: str) -> None:
    api = shared_api
    body = {**api.payment_body(str(api.world.frame["payment_id"].iloc[0])), **BAD_INPUTS[case]}
    r = api.client.post("/v1/payments/score", json=body, headers=api.key("score"))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    field = next(iter(BAD_INPUTS[case]))
    assert any(field in d["loc"] for d in detail), detail
    assert all("input" not in d for d in detail)  # the offending value is not echoed back


def test_nan_broken_json_and_huge_bodies(api: Api) -> None:
    headers = {**api.key("score"), "content-type": "application/json"}
    body = api.payment_body(str(api.world.frame["payment_id"].iloc[0]))
    raw = json.dumps({**body, "amount": float("nan")})
    assert api.client.post("/v1/payments/score", content=raw, headers=headers).status_code == 422
    assert api.client.post("/v1/payments/score", content=b"{not json", headers=headers).status_code == 422
    assert api.client.post("/v1/payments/score", content=b"[1, 2]", headers=headers).status_code == 422
    huge = json.dumps({**body, "item_ids": ["i-1"] * 20000})
    r = api.client.post("/v1/payments/score", content=huge, headers=headers)
    assert r.status_code == 422, r.text
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["body"] and detail["type"] == "body_too_large"
    assert "larger than 65536 bytes" in detail["msg"]

    def chunks():  # no Content-Length: counted while reading
        for _ in range(100):
            yield b" " * 1024

    r = api.client.post("/v1/payments/score", content=chunks(), headers=headers)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "body_too_large"


def test_events_update_online_features(api: Api) -> None:
    headers = api.key("events")
    event = {
        "event_id": "e-1",
        "user_id": "u-1",
        "item_id": "i-1",
        "event_type": "view",
        "event_time": "2026-01-10T10:00:00Z",
        "ip": "203.0.113.9",
    }
    r = api.client.post("/v1/events", json={"events": [event, {**event, "event_id": "e-2"}]}, headers=headers)
    assert r.status_code == 202 and r.json() == {"accepted": 2, "degraded": False}
    assert [e["event_id"] for e in api.source.interactions] == ["e-1", "e-2"]
    assert (
        api.client.post("/v1/events", json={"events": [event]}, headers=api.key("score")).status_code == 403
    )
    assert api.client.post("/v1/events", json={"events": []}, headers=headers).status_code == 422
    bad = {"events": [{**event, "event_type": "teleport"}]}
    assert api.client.post("/v1/events", json=bad, headers=headers).status_code == 422
    api.source.down = True
    r = api.client.post("/v1/events", json={"events": [event]}, headers=headers)
    assert r.status_code == 503 and "Retry-After" in r.headers


def test_a_batch_of_requests_is_decided_as_if_one_after_the_other(api: Api) -> None:
    """Requests that wait together are decided in one batch (`decide_payments`): a card-testing
    burst inside one batch is seen by each later payment, and a person held by policy in the same
    batch still goes to a human while the others are scored."""
    import pandas as pd

    from serving.schemas import PaymentIn
    from serving.scoring import decide_payments

    adults = api.adult_payments(2)
    burst_body = api.payment_body(adults[0])
    t0 = pd.Timestamp(burst_body["payment_time"])
    burst = [
        PaymentIn.model_validate(
            burst_body
            | {
                "payment_id": f"burst-{i}",
                "card_fingerprint": "card-never-seen-before",
                "amount": 1.0,
                "payment_time": (t0 + pd.Timedelta(seconds=i)).isoformat(),
            }
        )
        for i in range(5)
    ]
    held_body = api.payment_body(adults[1])
    api.services.ledger.record_control(
        held_body["user_id"], "restriction", active=True, collection_method="test"
    )
    held = PaymentIn.model_validate(held_body | {"payment_id": "held-1"})
    results = decide_payments(api.services, [burst[0], burst[1], held, *burst[2:]])
    assert not any(isinstance(r, BaseException) for r in results)
    outs = [r[0] for r in results]  # type: ignore[index]
    rows = [r[1] for r in results]  # type: ignore[index]
    assert outs[2].human_review and outs[2].fraud_probability is None
    counts = []
    for row in rows[:2] + rows[3:]:
        i = row["feature_names"].index("card_count_10m")
        counts.append(row["vectors"][0][i])
    assert counts == [1.0, 2.0, 3.0, 4.0, 5.0]
    # the same raw score as the model gives the logged row on its own
    bundle = api.services.models.version(rows[4]["model_name"], rows[4]["model_version"])
    x = np.array([[np.nan if v is None else v for v in rows[4]["vectors"][0]]])
    assert float(bundle.raw_score(x)[0]) == rows[4]["raw_scores"][0]


def test_a_database_outage_is_a_503_to_retry_and_logs_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consent ledger or the decision log unreachable: no decision is made or answered, the
    caller gets 503 with Retry-After (not a 500), and scoring works again once the database is back."""
    from sqlalchemy.exc import OperationalError

    svc = api.services
    headers = api.key("score")
    bodies = [api.payment_body(p) for p in api.adult_payments(3)]
    down = OperationalError("SELECT ...", None, ConnectionRefusedError("connection refused"))

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise down

    logged = svc.decisions.count()
    for target, name in ((svc.ledger, "_state_rows"), (svc.writer, "insert")):
        with monkeypatch.context() as m:
            m.setattr(target, name, refuse)
            r = api.client.post("/v1/payments/score", json=bodies[0], headers=headers)
        assert r.status_code == 503, (name, r.text)
        assert r.headers["retry-after"] == "1"
        assert "database is unavailable" in r.json()["detail"]
        assert svc.decisions.count() == logged  # nothing answered, nothing logged
    again = api.client.post("/v1/payments/score", json=bodies[1], headers=headers)
    assert again.status_code == 200 and svc.decisions.count() == logged + 1
