"""The API on the production stores: Redis online store (a real outage and recovery) and the
PostgreSQL decision log (reproducible explanations). Needs the servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from api_support import Api, World


pytest_plugins = ["api_support"]
pytestmark = pytest.mark.realserver

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _require(host: str, port: int, what: str) -> None:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{what} is not reachable on {host}:{port} (required in CI)")
        pytest.skip(f"{what} not reachable on {host}:{port}")


class Proxy:
    """A TCP proxy in front of Redis that can be cut and restored: a real network outage."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.muted = False  # connections stay open but nothing gets through: a hung Redis

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                if self.muted:
                    continue
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def start(self) -> None:
        async def go() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)

    def cut(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.close()
            for w in list(self.writers):
                w.close()
            self.writers.clear()

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)


@contextlib.contextmanager
def proxied_redis_api(world: World, var: Path, **settings: object) -> Iterator[tuple[Api, Proxy]]:
    """An API on a Redis online store reached through a `Proxy` (its own Feast project, removed after)."""
    _require("127.0.0.1", 6379, "Redis")
    import redis
    from api_support import _online_stores, open_api

    proxy = Proxy(("127.0.0.1", 6379))
    proxy.start()
    project = f"t_{secrets.token_hex(4)}"
    overrides = {
        "online_store": "redis",
        "redis_url": f"redis://127.0.0.1:{proxy.port}/0",
        "feast_project": project,
        **settings,
    }
    _online_stores(world.events_dir, world.settings(var, **overrides))
    try:
        with open_api(world, var, **overrides) as api:
            yield api, proxy
    finally:
        proxy.close()
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        keys = list(client.scan_iter(match=f"*{project}*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture
def redis_api(world: World, tmp_path: Path) -> Iterator[tuple[Api, Proxy]]:
    with proxied_redis_api(world, tmp_path / "var", online_retry_seconds=0.5) as pair:
        yield pair


def test_redis_outage_degrades_within_budget_and_recovers(redis_api: tuple[Api, Proxy]) -> None:
    api, proxy = redis_api
    api.source.down = False  # only the network fails in this test
    headers = api.key("score")
    body = api.payment_body(api.adult_payments(1)[0])
    first = api.client.post("/v1/payments/score", json=body, headers=headers).json()
    assert first["degraded"] is False and first["tier"] in ("full", "no_device_location")

    proxy.cut()
    started = time.perf_counter()
    cut = api.client.post("/v1/payments/score", json=body, headers=headers)
    elapsed = time.perf_counter() - started
    assert cut.status_code == 200
    out = cut.json()
    assert out["degraded"] is True and out["tier"] == "request_only" and out["fraud_probability"] is not None
    assert elapsed < 1.0
    assert api.client.get("/readyz").json()["online_store"] is False

    proxy.start()
    time.sleep(0.6)
    back = api.client.post("/v1/payments/score", json=body, headers=headers).json()
    assert back["degraded"] is False and back["tier"] == first["tier"]
    assert back["fraud_probability"] == first["fraud_probability"]  # same stored state, same answer


def test_hung_redis_degrades_after_the_socket_timeout(world: World, tmp_path: Path) -> None:
    """Redis accepts connections but never answers: without a socket timeout scoring would hang."""
    overrides = {
        "online_retry_seconds": 30.0,
        "redis_socket_timeout": 0.2,
        "redis_socket_connect_timeout": 0.2,
        "redis_retries": 1,
    }
    with proxied_redis_api(world, tmp_path / "var", **overrides) as (api, proxy):
        headers = api.key("score")
        body = api.payment_body(api.adult_payments(1)[0])
        first = api.client.post("/v1/payments/score", json=body, headers=headers).json()
        assert first["degraded"] is False
        proxy.muted = True
        outcome: dict[str, object] = {}

        def call() -> None:
            outcome["response"] = api.client.post("/v1/payments/score", json=body, headers=headers)

        caller = threading.Thread(target=call, daemon=True)
        started = time.perf_counter()
        caller.start()
        caller.join(timeout=10)  # a hang would never return; the bound only separates the two
        assert not caller.is_alive(), "scoring hung on a Redis that does not answer"
        elapsed = time.perf_counter() - started
        r = outcome["response"]
        assert r.status_code == 200  # type: ignore[attr-defined]
        out = r.json()  # type: ignore[attr-defined]
        assert out["degraded"] is True and out["tier"] == "request_only"
        assert elapsed < 2 * (1 + 1) * 0.2 + 1.0  # (1 + retries) timeouts, plus slack for a busy machine


@pytest.fixture
def pg_api(world: World, tmp_path: Path) -> Iterator[Api]:
    _require("127.0.0.1", 5432, "PostgreSQL")
    from api_support import open_api
    from sqlalchemy import create_engine, text

    schema = f"aipic_test_{secrets.token_hex(4)}"
    admin = create_engine(PG)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = f"{PG}?options=-csearch_path%3D{schema}"
        with open_api(world, tmp_path / "var", database_url=url) as api:
            yield api
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_postgres_decision_log_reproduces_and_keeps_keys_hashed(pg_api: Api) -> None:
    from sqlalchemy import text

    api = pg_api
    assert api.services.engine.dialect.name == "postgresql"
    headers = api.key("score")
    pid = api.adult_payments(1)[0]
    body = api.payment_body(pid)
    out = api.client.post("/v1/payments/score", json=body, headers=headers).json()
    e = api.client.get(f"/v1/decisions/{out['decision_id']}/explanation", headers=api.person(body["user_id"]))
    assert e.status_code == 200
    check = e.json()["reproducibility"]
    assert check["identical"] is True and check["contributions_sum_matches"] is True
    with api.services.engine.connect() as conn:
        stored = " ".join(str(v) for row in conn.execute(text("SELECT * FROM api_keys")) for v in row)
    assert headers["X-API-Key"].split("_")[2] not in stored


def test_a_dead_pooled_connection_costs_no_request(pg_api: Api) -> None:
    """The API's pool does not ping at checkout: a connection the server dropped is found on use,
    the pool is discarded and the read or the log write is retried on a fresh connection."""
    from sqlalchemy import create_engine, text

    api = pg_api
    headers = api.key("score")
    body = api.payment_body(api.adult_payments(1)[0])
    assert api.client.post("/v1/payments/score", json=body, headers=headers).status_code == 200
    engine = api.services.engine
    assert engine.pool._pre_ping is False  # type: ignore[attr-defined]
    with engine.connect() as conn:  # LIFO pool: the next checkout gets this very connection back
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    admin = create_engine(PG)
    try:
        with admin.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
    finally:
        admin.dispose()
    time.sleep(0.2)
    for i in range(3):
        again = {**body, "payment_id": f"{body['payment_id']}-after-kill-{i}"}
        r = api.client.post("/v1/payments/score", json=again, headers=headers)
        assert r.status_code == 200, r.text
