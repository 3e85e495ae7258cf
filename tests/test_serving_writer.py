"""Decision logging on shutdown: every queued decision is committed before shutdown completes.

The batches of `serving.batching` commit their own rows (`DecisionWriter.insert`); closing the
batcher decides and logs what is queued first, and every caller gets its answer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from features_kit import postgres_schema
from sqlalchemy import Engine, func, select


def _row(i: int) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "subject_id": f"u{i}",
        "kind": "payment_score",
        "reference_id": f"p{i}",
        "purpose": "fraud_detection",
        "tier": "full",
        "degraded": False,
        "model_name": "fraud-full",
        "model_version": "1",
        "model_hash": "0" * 64,
        "feature_names": ["amount"],
        "vectors": [[float(i)]],
        "raw_scores": [0.0],
        "probability": 0.5,
        "thresholds": None,
        "outcome": "approve",
        "source": "automated",
        "human_review_required": False,
        "consent_snapshot": {},
        "output": {},
        "supersedes": None,
        "created_at": dt.datetime.now(dt.UTC),
    }


def test_close_commits_every_queued_row_and_answers_every_writer(tmp_path: Path) -> None:
    from features.db import engine_for
    from serving.batching import MicroBatcher
    from serving.decisions import DecisionRecord, DecisionWriter, ensure_tables

    engine = engine_for(f"sqlite:///{tmp_path / 'service.db'}")
    ensure_tables(engine)
    writer = DecisionWriter(engine)

    def log(rows: list[dict[str, Any]]) -> list[None]:
        writer.insert(rows, [])
        return [None] * len(rows)

    batcher: MicroBatcher[dict[str, Any], None] = MicroBatcher(log, workers=2, max_batch=7, name="t")

    async def run() -> list[BaseException | None]:
        tasks = [asyncio.create_task(batcher.submit(_row(i))) for i in range(50)]
        await asyncio.sleep(0)  # all 50 queued, at most the first batches picked up
        await batcher.close()  # shutdown: must flush, not drop, what is queued
        done, pending = await asyncio.wait(tasks, timeout=10)
        assert not pending, "a caller was left waiting for a commit that never came"
        return [t.exception() for t in done]

    errors = asyncio.run(run())
    assert errors == [None] * 50
    assert writer.written == 50
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(DecisionRecord)).scalar_one() == 50


def test_a_failed_commit_answers_no_item_of_the_batch(tmp_path: Path) -> None:
    from sqlalchemy.exc import IntegrityError

    from features.db import engine_for
    from serving.decisions import DecisionRecord, DecisionWriter, ensure_tables

    engine = engine_for(f"sqlite:///{tmp_path / 'service.db'}")
    ensure_tables(engine)
    writer = DecisionWriter(engine)
    bad_input = ValueError("bad payment")
    ok = writer.log_batch([("a", _row(1)), bad_input, ("b", _row(2))], lambda r: (r[1], None))
    assert ok[0][0] == "a" and ok[1] is bad_input and ok[2][0] == "b"  # type: ignore[index]
    clash = _row(3)
    failed = writer.log_batch([("c", clash), bad_input, ("d", clash)], lambda r: (r[1], None))
    assert isinstance(failed[0], IntegrityError) and failed[1] is bad_input and failed[2] is failed[0]
    with engine.connect() as conn:  # the failed batch left nothing behind
        assert conn.execute(select(func.count()).select_from(DecisionRecord)).scalar_one() == 2
    assert writer.written == 2


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    """The service's tables in a fresh schema on the real PostgreSQL server."""
    from serving.decisions import ensure_tables

    with postgres_schema(ensure_tables) as engine:
        yield engine


@pytest.mark.realserver
def test_on_postgresql_a_batch_is_logged_whole_or_not_at_all(pg_engine: Engine) -> None:
    """PostgreSQL batches without reviews go out as one autocommit pipeline (no BEGIN/COMMIT
    round trips): a row that fails in the middle must still leave none of the batch behind,
    and a batch with a review (two tables, one transaction) likewise."""
    from sqlalchemy.exc import IntegrityError

    from serving.decisions import DecisionRecord, DecisionWriter, ReviewRecord, policy_review

    writer = DecisionWriter(pg_engine)

    def count(table: type) -> int:
        with pg_engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

    first, clash, last = _row(1), _row(2), _row(3)
    writer.insert([first], [])
    assert count(DecisionRecord) == 1
    with pytest.raises(IntegrityError):  # the second row repeats the first one's id
        writer.insert([clash, first | {"reference_id": "again"}, last], [])
    assert count(DecisionRecord) == 1  # neither the row before the clash nor the one after
    review = policy_review(first["id"], "u1", "model")
    with pytest.raises(IntegrityError):  # the decision rows fail: the review goes too
        writer.insert([_row(4), first], [review])
    assert count(DecisionRecord) == 1 and count(ReviewRecord) == 0
    writer.insert([clash, last], [policy_review(clash["id"], "u2", "model")])
    assert count(DecisionRecord) == 3 and count(ReviewRecord) == 1
    fifth = _row(5)
    with pytest.raises(IntegrityError):  # the review fails (it points at no decision): the rows go too
        writer.insert([fifth], [policy_review("no-such-decision", "u5", "model")])
    assert count(DecisionRecord) == 3 and count(ReviewRecord) == 1
    assert writer.written == 3
    with pg_engine.connect() as conn:  # the pooled connection is back in a usable state
        assert conn.connection.driver_connection.autocommit is False
        assert conn.connection.driver_connection.info.transaction_status.name == "IDLE"


@pytest.mark.realserver
def test_on_postgresql_the_driver_level_insert_stores_what_sqlalchemy_stores(pg_engine: Engine) -> None:
    """The writer bypasses SQLAlchemy's execution layer (statements compiled once from the tables):
    a decision row and a review must come back exactly as SQLAlchemy's own insert stores them,
    JSON nulls, defaults and UTC times included, and the pooled connection must be left as
    SQLAlchemy expects it."""
    from sqlalchemy import insert

    from serving.decisions import DecisionRecord, DecisionWriter, ReviewRecord, policy_review

    writer = DecisionWriter(pg_engine)
    assert writer._driver is not None
    when = dt.datetime(2026, 3, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    shared = {
        "created_at": when,
        "thresholds": None,
        "vectors": [[1.5, None, 3.0]],
        "consent_snapshot": {"tier": "full", "consents": {"a": "given"}},
    }
    lean = {k: v for k, v in (_row(1) | shared).items() if k not in ("degraded", "human_review_required")}
    driver_row = lean | {"id": str(uuid.uuid4())}
    sqlalchemy_row = lean | {"id": str(uuid.uuid4()), "degraded": False, "human_review_required": False}
    driver_review = policy_review(driver_row["id"], "u1", "model") | {"requested_at": when}
    sqlalchemy_review = driver_review | {"id": str(uuid.uuid4()), "decision_id": sqlalchemy_row["id"]}
    writer.insert([driver_row], [driver_review])
    with pg_engine.begin() as conn:
        conn.execute(insert(DecisionRecord), [sqlalchemy_row])
        conn.execute(insert(ReviewRecord), [sqlalchemy_review])
    with pg_engine.connect() as conn:
        stored = {
            r["id"]: dict(r)
            for r in conn.execute(select(DecisionRecord.__table__)).mappings()  # type: ignore[arg-type]
        }
        reviews = {
            r["decision_id"]: dict(r)
            for r in conn.execute(select(ReviewRecord.__table__)).mappings()  # type: ignore[arg-type]
        }
        nulls = conn.execute(
            select(func.count()).where(DecisionRecord.thresholds.is_(None))  # SQL NULL, not JSON null
        ).scalar_one()
        assert conn.connection.driver_connection.autocommit is False
    a, b = stored.pop(driver_row["id"]), stored.pop(sqlalchemy_row["id"])
    assert {k: v for k, v in a.items() if k != "id"} == {k: v for k, v in b.items() if k != "id"}
    assert a["created_at"] == when and a["degraded"] is False and a["thresholds"] is None
    assert nulls == 0  # both paths store None as JSON null, as SQLAlchemy's JSON type does
    ra, rb = reviews[driver_row["id"]], reviews[sqlalchemy_row["id"]]
    drop = ("id", "decision_id")
    assert {k: v for k, v in ra.items() if k not in drop} == {k: v for k, v in rb.items() if k not in drop}
    assert ra["requested_at"] == when and ra["status"] == "open" and ra["statement"] is None


def test_retry_if_connection_died_runs_once_more_only_after_a_dead_connection() -> None:
    from sqlalchemy.exc import DBAPIError

    from features.db import retry_if_connection_died

    def failing(invalidated: bool) -> DBAPIError:
        return DBAPIError("SELECT 1", None, ConnectionError("gone"), connection_invalidated=invalidated)

    calls: list[int] = []

    def dies_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise failing(True)
        return "read"

    assert retry_if_connection_died(dies_once) == "read" and len(calls) == 2
    for errors in ([failing(False)], [failing(True), failing(True)]):  # not a dead connection; dead twice
        pending = list(errors)

        def work(pending: list[DBAPIError] = pending) -> str:
            raise pending.pop(0)

        with pytest.raises(DBAPIError):
            retry_if_connection_died(work)
        assert pending == []  # a live-connection error is not retried; a second death is not retried again
