"""Who may call what: 401 vs 403, hashed keys, token checks, rate limits, nothing secret in logs."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from sqlalchemy import text

from serving.auth import ApiKeyStore, AuthError, ScopeError, parse_scopes

if TYPE_CHECKING:
    from api_support import Api


pytest_plugins = ["api_support"]


def _any_payment(api: Api) -> dict[str, object]:
    return api.payment_body(str(api.world.frame["payment_id"].iloc[0]))


def test_missing_and_bad_credentials_are_401(api: Api) -> None:
    body = _any_payment(api)
    r = api.client.post("/v1/payments/score", json=body)
    assert r.status_code == 401
    assert "WWW-Authenticate" in r.headers
    for headers in (
        {"X-API-Key": "not-a-key"},
        {"X-API-Key": "aipic_deadbeef0000_wrongsecret"},
        {"Authorization": "Bearer not.a.jwt"},
    ):
        assert api.client.post("/v1/payments/score", json=body, headers=headers).status_code == 401


def test_key_without_scope_or_person_token_is_403(api: Api) -> None:
    body = _any_payment(api)
    r = api.client.post("/v1/payments/score", json=body, headers=api.key("recommend"))
    assert r.status_code == 403
    assert "score" in r.json()["detail"]
    assert api.client.post("/v1/payments/score", json=body, headers=api.person("u1")).status_code == 403
    # and a key on a person-only endpoint
    assert api.client.get("/v1/me/consent", headers=api.key("admin")).status_code == 403


def test_keys_are_stored_hashed_and_revocable(api: Api) -> None:
    store: ApiKeyStore = api.services.keys
    key_id, key = store.create(["score"], "hash test")
    secret = key.split("_")[2]
    with api.services.engine.connect() as conn:
        dump = " ".join(str(v) for row in conn.execute(text("SELECT * FROM api_keys")) for v in row)
    assert secret not in dump and key_id in dump
    assert store.verify(key).scopes == frozenset({"score"})
    assert store.revoke(key_id)
    with pytest.raises(AuthError):
        store.verify(key)
    r = api.client.post("/v1/payments/score", json=_any_payment(api), headers={"X-API-Key": key})
    assert r.status_code == 401


def test_scope_names_are_validated() -> None:
    assert parse_scopes("score, recommend,score") == ["score", "recommend"]
    with pytest.raises(ScopeError):
        parse_scopes("score,root")
    with pytest.raises(ScopeError):
        parse_scopes("")


def test_token_signature_audience_and_expiry_are_checked(api: Api) -> None:
    s = api.settings
    secret = s.jwt_secret.get_secret_value() if s.jwt_secret else ""
    now = dt.datetime.now(dt.UTC)
    good = {"sub": "u1", "aud": s.jwt_audience, "iss": s.jwt_issuer, "exp": now + dt.timedelta(minutes=5)}
    cases = {
        "valid": (jwt.encode(good, secret, algorithm="HS256"), 200),
        "wrong key": (jwt.encode(good, "another-secret-" + "y" * 32, algorithm="HS256"), 401),
        "wrong audience": (jwt.encode({**good, "aud": "someone-else"}, secret, algorithm="HS256"), 401),
        "expired": (
            jwt.encode({**good, "exp": now - dt.timedelta(minutes=5)}, secret, algorithm="HS256"),
            401,
        ),
        "no expiry": (
            jwt.encode({k: v for k, v in good.items() if k != "exp"}, secret, algorithm="HS256"),
            401,
        ),
        "alg none": (jwt.encode(good, None, algorithm="none"), 401),
    }
    for name, (token, expected) in cases.items():
        r = api.client.get("/v1/me/consent", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == expected, name


def test_rate_limit_per_key(api_factory: Callable[..., Any]) -> None:
    with api_factory(api_rate_limit="3/minute") as api:
        a, b = api.key("score"), api.key("score")
        body = _any_payment(api)
        codes = [api.client.post("/v1/payments/score", json=body, headers=a).status_code for _ in range(4)]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429
        assert api.client.post("/v1/payments/score", json=body, headers=b).status_code == 200  # own budget
        r = api.client.post("/v1/payments/score", json=body, headers=a)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1


def test_no_keys_tokens_or_personal_data_in_logs(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    headers = api.key("score", "support")
    person = api.person("u-logcheck")
    body = _any_payment(api)
    api.source.down = True  # degraded path logs a warning
    r = api.client.post("/v1/payments/score", json=body, headers=headers)
    assert r.status_code == 200 and r.json()["degraded"]
    api.client.post("/v1/payments/score", json=body, headers={"X-API-Key": headers["X-API-Key"] + "x"})
    api.client.get("/v1/me/consent", headers=person)
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "degraded" in logged
    secrets = [headers["X-API-Key"], headers["X-API-Key"].split("_")[2], person["Authorization"].split()[1]]
    personal = [str(body.get("ip", "")), str(body.get("card_fingerprint", ""))]
    for needle in secrets + [p for p in personal if p]:
        assert needle not in logged
