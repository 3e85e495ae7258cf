"""POST /v1/recommendations and the person's consent/rights endpoints (GET/PUT /v1/me/...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from features.rec_features import REC_FEATURES_BY_NAME

if TYPE_CHECKING:
    from api_support import Api


pytest_plugins = ["api_support"]


def _known_adult(api: Api) -> str:
    """A buyer with history in the snapshot and a declared adult age."""
    pid = api.adult_payments(1, riskiest=False)[0]
    return str(api.world.payments.set_index("payment_id").loc[pid, "user_id"])


def _personal(names: list[str]) -> list[str]:
    return [n for n in names if REC_FEATURES_BY_NAME[n].categories]


def test_unknown_user_gets_the_limited_tier(api: Api) -> None:
    r = api.client.post(
        "/v1/recommendations", json={"user_id": "brand-new-user", "k": 7}, headers=api.key("recommend")
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["personalized"] is False and out["tier"] == "limited"
    assert 1 <= len(out["items"]) <= 7
    assert [i["rank"] for i in out["items"]] == list(range(1, len(out["items"]) + 1))
    assert all(i["reason"] for i in out["items"])
    assert out["model"]["name"] == "recommender-limited"


@pytest.mark.consent
def test_withdrawal_makes_the_next_call_limited_without_personal_features(api: Api) -> None:
    user = _known_adult(api)
    me, backend = api.person(user), api.key("recommend")
    body = {"user_id": user, "k": 5}
    r = api.client.put(
        "/v1/me/consent", json={"purpose": "personalised_recommendations", "status": "given"}, headers=me
    )
    assert r.status_code == 200
    assert {c["purpose"]: c["valid"] for c in r.json()["consents"]}["personalised_recommendations"] is True

    first = api.client.post("/v1/recommendations", json=body, headers=backend).json()
    assert first["personalized"] is True and first["tier"] == "personalized"
    logged = api.services.decisions.get(first["decision_id"])
    assert _personal(logged["feature_names"])  # the profile was used

    r = api.client.put(
        "/v1/me/consent", json={"purpose": "personalised_recommendations", "status": "withdrawn"}, headers=me
    )
    assert r.status_code == 200
    second = api.client.post("/v1/recommendations", json=body, headers=backend).json()
    assert second["personalized"] is False and second["tier"] == "limited"
    logged = api.services.decisions.get(second["decision_id"])
    assert _personal(logged["feature_names"]) == []
    assert (
        logged["consent_snapshot"]["consent"]["consents"]["personalised_recommendations"]["status"]
        == "withdrawn"
    )


@pytest.mark.consent
def test_objection_and_restriction_stop_profiling(api: Api) -> None:
    user = _known_adult(api)
    me, backend = api.person(user), api.key("recommend")
    api.client.put(
        "/v1/me/consent", json={"purpose": "personalised_recommendations", "status": "given"}, headers=me
    )
    r = api.client.post("/v1/me/objection", json={"purpose": "personalised_recommendations"}, headers=me)
    assert r.status_code == 200 and r.json()["objections"] == ["personalised_recommendations"]
    out = api.client.post("/v1/recommendations", json={"user_id": user}, headers=backend).json()
    assert out["tier"] == "limited"
    api.client.post(
        "/v1/me/objection", json={"purpose": "personalised_recommendations", "active": False}, headers=me
    )
    assert api.client.post("/v1/recommendations", json={"user_id": user}, headers=backend).json()[
        "personalized"
    ]
    r = api.client.post("/v1/me/restriction", json={"active": True}, headers=me)
    assert r.status_code == 200 and r.json()["restricted"] is True
    assert (
        api.client.post("/v1/recommendations", json={"user_id": user}, headers=backend).json()["tier"]
        == "limited"
    )


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "u1", "k": 0},
        {"user_id": "u1", "k": 101},
        {"user_id": "u1", "k": "5"},
        {"user_id": "u1", "k": 5.0},
        {"user_id": ""},
        {"user_id": "u1", "context": {"item_id": "ß"}},
        {"user_id": "u1", "context": {"exclude_item_ids": ["x"] * 201}},
        {"k": 3},
    ],
)
def test_recommendation_bad_input_is_422(shared_api: Api, body: dict) -> None:
    api = shared_api
    assert api.client.post("/v1/recommendations", json=body, headers=api.key("recommend")).status_code == 422


def test_recommendations_need_the_recommend_scope(api: Api) -> None:
    body = {"user_id": "u1"}
    assert api.client.post("/v1/recommendations", json=body).status_code == 401
    assert api.client.post("/v1/recommendations", json=body, headers=api.key("score")).status_code == 403
    assert api.client.post("/v1/recommendations", json=body, headers=api.person("u1")).status_code == 403


@pytest.mark.consent
def test_consent_endpoints_act_only_on_the_token_subject(api: Api) -> None:
    me = api.person("u-alice")
    r = api.client.get("/v1/me/consent", headers=me)
    assert r.status_code == 200
    view = r.json()
    assert view["subject_id"] == "u-alice" and not view["restricted"]
    assert {c["status"] for c in view["consents"]} == {"unknown"}
    api.client.put("/v1/me/consent", json={"purpose": "marketing", "status": "given"}, headers=me)
    other = api.client.get("/v1/me/consent", headers=api.person("u-bob")).json()
    assert {c["status"] for c in other["consents"]} == {"unknown"}
    for bad in (
        {"purpose": "marketing", "status": "maybe"},
        {"purpose": "spam", "status": "given"},
        {"purpose": "marketing", "status": "given", "subject_id": "u-bob"},
    ):
        assert api.client.put("/v1/me/consent", json=bad, headers=me).status_code == 422
    assert api.client.post("/v1/me/restriction", json={"active": "yes"}, headers=me).status_code == 422
    assert api.client.get("/v1/me/consent").status_code == 401


@pytest.mark.consent
def test_export_and_erasure(api_factory: Callable[..., Any]) -> None:
    with api_factory(copy_events=True) as api:  # erasure rewrites the event files
        _export_and_erase(api)


def _export_and_erase(api: Api) -> None:
    user = _known_adult(api)
    me = api.person(user)
    pid = api.world.payments.loc[api.world.payments["user_id"] == user, "payment_id"].iloc[0]
    scored = api.client.post(
        "/v1/payments/score", json=api.payment_body(str(pid)), headers=api.key("score")
    ).json()
    api.client.put(
        "/v1/me/consent", json={"purpose": "personalised_recommendations", "status": "given"}, headers=me
    )
    r = api.client.get("/v1/me/export", headers=me)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["subject_id"] == user
    assert scored["decision_id"] in doc["explanations"]
    assert doc["explanations"][scored["decision_id"]]["reproducibility"]["identical"] is True
    assert [h["status"] for h in doc["consent"]["history"]] == ["given"]
    assert api.client.get("/v1/me/export", headers=api.key("admin")).status_code == 403

    r = api.client.delete("/v1/me", headers=me)
    assert r.status_code == 200, r.text
    assert r.json()["counts"]["service_tables"]["decision_log"] >= 1
    gone = api.client.get(f"/v1/decisions/{scored['decision_id']}/explanation", headers=me)
    assert gone.status_code == 404
    assert api.services.decisions.for_subject(user) == []
    from features.storage import read_table

    assert user not in set(read_table(api.settings.events_dir, "payments")["user_id"])
