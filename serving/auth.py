"""Who is calling: API keys of the marketplace backend and tokens of people (JWT).

API keys look like ``aipic_<key id>_<secret>``. Only the SHA-256 of the secret is stored (the
secret is 256 random bits, so a slow password hash adds nothing) and it is compared in
constant time. Each key carries scopes: ``score``, ``recommend``, ``events``, ``support``,
``admin``. Lookups are cached for a few seconds so a request does not hit the database, and a
revoked key stops working within that time.

People carry an HS256 JWT the marketplace issues: signature, audience, issuer and expiry are
checked; ``sub`` is the person's user id. Neither keys nor tokens are ever logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jwt
from sqlalchemy import Engine, insert, select, update

from features.settings import Settings
from serving.decisions import ApiKeyRecord, now_utc

SCOPES: tuple[str, ...] = ("score", "recommend", "events", "support", "admin")
KEY_PREFIX = "aipic"
JWT_ALGORITHM = "HS256"


class AuthError(Exception):
    """Credentials missing or invalid (HTTP 401). The message never contains the credential."""


class ScopeError(ValueError):
    """Unknown scope names given when creating a key."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: an API key (scopes) or a person (subject)."""

    kind: Literal["key", "person"]
    id: str  # key id or person's user id; safe to log (no secret)
    scopes: frozenset[str] = frozenset()

    @property
    def subject(self) -> str | None:
        return self.id if self.kind == "person" else None

    def has(self, scope: str) -> bool:
        return self.kind == "key" and (scope in self.scopes or "admin" in self.scopes)


def parse_scopes(raw: str | Iterable[str]) -> list[str]:
    """Validate scope names (comma-separated string or list); order kept, duplicates dropped."""
    items = [s.strip() for s in (raw.split(",") if isinstance(raw, str) else raw)]
    items = [s for s in items if s]
    unknown = [s for s in items if s not in SCOPES]
    if unknown or not items:
        raise ScopeError(f"unknown or empty scopes {unknown or items}; choose from {', '.join(SCOPES)}")
    return list(dict.fromkeys(items))


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _split_key(key: str) -> tuple[str, str] | None:
    parts = key.split("_")
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


@dataclass(frozen=True)
class _Cached:
    digest: str | None  # None = no such key / revoked
    scopes: frozenset[str]
    fetched: float


class ApiKeyStore:
    """Create, verify and revoke API keys on the service database."""

    def __init__(self, engine: Engine, cache_seconds: float = 5.0) -> None:
        self.engine = engine
        self.cache_seconds = cache_seconds
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def create(self, scopes: Iterable[str] | str, label: str = "") -> tuple[str, str]:
        """Store a new key; return ``(key_id, key)``. The key is shown once and never stored."""
        names = parse_scopes(scopes)
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32).replace("_", "-")
        with self.engine.begin() as conn:
            conn.execute(
                insert(ApiKeyRecord),
                [
                    {
                        "key_id": key_id,
                        "secret_sha256": _sha256(secret),
                        "scopes": names,
                        "label": label[:128],
                        "created_at": now_utc(),
                        "revoked_at": None,
                    }
                ],
            )
        return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"

    def revoke(self, key_id: str) -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(
                update(ApiKeyRecord)
                .where(ApiKeyRecord.key_id == key_id, ApiKeyRecord.revoked_at.is_(None))
                .values(revoked_at=now_utc())
            ).rowcount
        with self._lock:
            self._cache.pop(key_id, None)
        return bool(done)

    def list(self) -> list[dict[str, object]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    ApiKeyRecord.key_id,
                    ApiKeyRecord.label,
                    ApiKeyRecord.scopes,
                    ApiKeyRecord.created_at,
                    ApiKeyRecord.revoked_at,
                ).order_by(ApiKeyRecord.created_at)
            ).mappings()
            return [dict(r) for r in rows]

    def _lookup(self, key_id: str) -> _Cached:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key_id)
        if hit is not None and now - hit.fetched < self.cache_seconds:
            return hit
        with self.engine.connect() as conn:
            row = conn.execute(
                select(ApiKeyRecord.secret_sha256, ApiKeyRecord.scopes, ApiKeyRecord.revoked_at).where(
                    ApiKeyRecord.key_id == key_id
                )
            ).first()
        if row is None or row.revoked_at is not None:
            entry = _Cached(None, frozenset(), now)
        else:
            entry = _Cached(row.secret_sha256, frozenset(row.scopes), now)
        with self._lock:
            if len(self._cache) > 10_000:  # unknown ids must not grow the cache without bound
                self._cache.clear()
            self._cache[key_id] = entry
        return entry

    def needs_lookup(self, key: str) -> bool:
        """Whether `verify` would query the database (no fresh cache entry): call it in a thread then."""
        parts = _split_key(key)
        if parts is None or len(key) > 200:
            return False
        with self._lock:
            hit = self._cache.get(parts[0])
        return hit is None or time.monotonic() - hit.fetched >= self.cache_seconds

    def verify(self, key: str) -> Principal:
        """The key's principal, or AuthError. Digests are compared in constant time."""
        parts = _split_key(key)
        if parts is None or len(key) > 200:
            raise AuthError("malformed API key")
        key_id, secret = parts
        entry = self._lookup(key_id)
        given = _sha256(secret)
        expected = entry.digest or "0" * 64
        if not hmac.compare_digest(given, expected) or entry.digest is None:
            raise AuthError("invalid or revoked API key")
        return Principal("key", key_id, entry.scopes)


# --- person tokens -------------------------------------------------------------------------------


def jwt_secret(settings: Settings) -> str:
    """The HMAC key of person tokens: ``AIPIC_JWT_SECRET``, or (local only) a generated dev key.

    Production refuses to start without a strong secret (see `Settings`); locally a random key
    is kept in ``var/secrets/jwt_secret`` so `aipic auth issue-token` and `aipic serve` agree.
    """
    if settings.jwt_secret is not None and settings.jwt_secret.get_secret_value():
        return settings.jwt_secret.get_secret_value()
    if settings.environment == "production":  # pragma: no cover - Settings already refuses this
        raise AuthError("AIPIC_JWT_SECRET is not set")
    path = Path(settings.var_dir) / "secrets" / "jwt_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{secrets.token_hex(4)}")
        tmp.write_text(secrets.token_urlsafe(48))
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # first writer wins; concurrent starters read the same key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def issue_token(settings: Settings, subject: str, ttl: dt.timedelta | None = None) -> str:
    """A person token for ``subject`` (development, tests; production tokens come from the marketplace)."""
    if not subject or len(subject) > 128:
        raise AuthError("subject must be 1-128 characters")
    now = dt.datetime.now(dt.UTC)
    claims = {
        "sub": subject,
        "aud": settings.jwt_audience,
        "iss": settings.jwt_issuer,
        "iat": now,
        "nbf": now,
        "exp": now + (ttl or dt.timedelta(minutes=settings.jwt_ttl_minutes)),
    }
    return jwt.encode(claims, jwt_secret(settings), algorithm=JWT_ALGORITHM)


class TokenVerifier:
    """Checks person tokens with the secret resolved once at start."""

    def __init__(self, settings: Settings) -> None:
        self._secret = jwt_secret(settings)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer

    def verify(self, token: str) -> Principal:
        if len(token) > 4096:
            raise AuthError("token too long")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[JWT_ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "sub", "aud", "iss"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token has the wrong audience") from None
        except jwt.InvalidTokenError:
            raise AuthError("invalid token") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > 128:
            raise AuthError("token has no valid subject")
        return Principal("person", subject)
