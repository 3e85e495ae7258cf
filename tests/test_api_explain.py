"""GET /v1/decisions/{id}/explanation and the review flow: content, reproducibility, who may see what."""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

import numpy as np

from features.events import ConsentPurpose

REQUIRED = {
    "decision_id",
    "decided_at",
    "outcome",
    "significance",
    "consequences",
    "solely_automated",
    "art22_ground",
    "purpose",
    "legal_basis",
    "logic",
    "principal_reasons",
    "data_used",
    "data_not_used",
    "what_would_change_it",
    "model",
    "explanation_method",
    "reproducibility",
    "your_rights",
}

if TYPE_CHECKING:
    from api_support import Api


pytest_plugins = ["api_support"]


def _decide(api: Api, outcome: str | None = None) -> tuple[dict, str]:
    """Score adult payments until one has ``outcome`` (any if None); return (response, user)."""
    headers = api.key("score")
    for pid in api.adult_payments(60):
        body = api.payment_body(pid)
        out = api.client.post("/v1/payments/score", json=body, headers=headers).json()
        if outcome is None or out["outcome"] == outcome:
            return out, body["user_id"]
    raise AssertionError(f"no {outcome} among the test payments")


def test_explanation_of_a_decline_has_every_field_and_reproduces(api: Api) -> None:
    out, user = _decide(api, "decline")
    r = api.client.get(f"/v1/decisions/{out['decision_id']}/explanation", headers=api.person(user))
    assert r.status_code == 200, r.text
    e = r.json()
    assert set(e) >= REQUIRED
    assert e["outcome"] == "decline" and e["solely_automated"] is True
    assert e["art22_ground"] and "22(2)" in e["art22_ground"]
    assert e["purpose"] == "fraud_detection" and "6(1)(f)" in e["legal_basis"]
    assert "probability" in e["logic"] and "decline" in e["logic"]
    check = e["reproducibility"]
    assert check["identical"] is True and check["logged_raw_score"] == check["rescored_raw_score"]
    assert check["contributions_sum_matches"] is True and check["model_hash_matches"] is True
    assert abs(check["contributions_sum"] - check["rescored_raw_score"]) < 1e-9
    reasons = e["principal_reasons"]
    assert 1 <= len(reasons) <= 4
    assert all(r["effect"] == "raised" and r["contribution"] > 0 for r in reasons)
    assert all("yours was" in r["statement"] for r in reasons)
    # reasons carry the person's own values from the logged vector
    row = api.services.decisions.get(out["decision_id"])
    logged = dict(zip(row["feature_names"], row["vectors"][0], strict=True))
    for reason in reasons:
        assert reason["your_value"] == logged[reason["feature"]]
    # categories: used ones name their inputs; device/location not used, with the consent reason
    not_used = {c["category"]: c["why"] for c in e["data_not_used"]}
    assert "user.device" in not_used and "consent" in not_used["user.device"]
    assert any(c.startswith("user.demographic") for c in not_used)
    # a counterfactual a fraudster cannot use: no amounts or thresholds
    changes = " ".join(e["what_would_change_it"])
    assert changes and "review" in changes
    assert not re.search(r"amount|below|under|threshold|\d", changes)
    rights = e["your_rights"]
    assert "CPDP" in rights["complain"] and "/review" in rights["human_review"]
    assert e["model"] == out["model"]


def test_explanation_of_an_approval_lists_what_lowered_the_risk(api: Api) -> None:
    out, user = _decide(api, "approve")
    e = api.client.get(f"/v1/decisions/{out['decision_id']}/explanation", headers=api.person(user)).json()
    assert e["art22_ground"] is None and e["what_would_change_it"] == []
    assert all(r["effect"] == "lowered" for r in e["principal_reasons"])
    assert e["reproducibility"]["identical"] is True


def test_someone_elses_decision_is_404_and_support_sees_it(api: Api) -> None:
    out, user = _decide(api)
    path = f"/v1/decisions/{out['decision_id']}/explanation"
    other = api.client.get(path, headers=api.person(user + "-other"))
    assert other.status_code == 404 and out["decision_id"] not in other.text
    assert api.client.get(path, headers=api.key("support")).status_code == 200
    assert api.client.get(path, headers=api.key("score")).status_code == 403
    assert api.client.get(path).status_code == 401
    assert (
        api.client.get(f"/v1/decisions/{uuid.uuid4()}/explanation", headers=api.person(user)).status_code
        == 404
    )
    assert api.client.get("/v1/decisions/not-an-id/explanation", headers=api.person(user)).status_code == 422


def test_review_flow_keeps_the_automated_decision(api: Api) -> None:
    out, user = _decide(api)
    did = out["decision_id"]
    me = api.person(user)
    r = api.client.post(
        f"/v1/decisions/{did}/review", json={"statement": "C'était bien moi — I bought it."}, headers=me
    )
    assert r.status_code == 201, r.text
    review = r.json()
    assert review["status"] == "open" and review["decision_id"] == did
    # others cannot ask on my behalf, backend keys cannot either, bad statements are refused
    assert (
        api.client.post(
            f"/v1/decisions/{did}/review", json={"statement": "x"}, headers=api.person("zz")
        ).status_code
        == 404
    )
    assert (
        api.client.post(
            f"/v1/decisions/{did}/review", json={"statement": "x"}, headers=api.key("support")
        ).status_code
        == 403
    )
    for bad in (
        {"statement": ""},
        {"statement": "a\u0000b"},
        {"statement": "x" * 3000},
        {},
        {"statement": 5},
    ):
        assert api.client.post(f"/v1/decisions/{did}/review", json=bad, headers=me).status_code == 422

    support = api.key("support")
    queue = api.client.get("/v1/reviews", headers=support).json()["reviews"]
    assert review["review_id"] in [q["review_id"] for q in queue]
    assert api.client.get("/v1/reviews", headers=api.key("score")).status_code == 403
    assert api.client.get("/v1/reviews", headers=me).status_code == 403
    assert api.client.get("/v1/reviews?limit=0", headers=support).status_code == 422

    done = api.client.post(
        f"/v1/reviews/{review['review_id']}/resolve",
        json={"reviewer": "staff-1", "outcome": "approve", "note": "Verified."},
        headers=support,
    )
    assert done.status_code == 200 and done.json()["status"] == "resolved"
    again = api.client.post(
        f"/v1/reviews/{review['review_id']}/resolve",
        json={"reviewer": "staff-1", "outcome": "decline"},
        headers=support,
    )
    assert again.status_code == 409
    missing = api.client.post(
        f"/v1/reviews/{uuid.uuid4()}/resolve", json={"reviewer": "s", "outcome": "approve"}, headers=support
    )
    assert missing.status_code == 404

    automated = api.services.decisions.get(did)
    assert automated["source"] == "automated" and automated["outcome"] == out["outcome"]
    e = api.client.get(f"/v1/decisions/{did}/explanation", headers=me).json()
    assert e["superseded_by_human"]["outcome"] == "approve" and e["solely_automated"] is False
    human = api.services.decisions.get(e["superseded_by_human"]["decision_id"])
    assert human["source"] == "human" and human["supersedes"] == did


def test_reproducibility_of_a_recommendation(api: Api) -> None:
    user = str(api.world.frame["user_id"].iloc[0])
    api.services.ledger.append(user, ConsentPurpose.PERSONALISATION, "given", collection_method="test")
    out = api.client.post(
        "/v1/recommendations", json={"user_id": user, "k": 5}, headers=api.key("recommend")
    ).json()
    e = api.client.get(f"/v1/decisions/{out['decision_id']}/explanation", headers=api.person(user)).json()
    assert e["kind"] == "recommendation" and e["reproducibility"]["identical"] is True
    row = api.services.decisions.get(out["decision_id"])
    assert np.array_equal(np.asarray(row["raw_scores"]), np.asarray([i["score"] for i in out["items"]]))
