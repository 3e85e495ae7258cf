"""The consent ledger: migrations, append-only history, derived state, import; SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from features_kit import postgres_schema
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from features.events import ConsentPurpose, ConsentStatus
from features.migrations import current_revisions, head_revisions, migrate, target_metadata
from features.privacy.ledger import ConsentLedger, ConsentRecord, LedgerError
from features.storage import write_table

pytestmark = pytest.mark.consent

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
P = ConsentPurpose.PERSONALISATION
D = ConsentPurpose.DEVICE_LOCATION_SIGNALS


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    return engine


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    """A fresh schema on the real PostgreSQL server, migrated; dropped afterwards."""
    with postgres_schema(migrate) as engine:
        yield engine


def _exercise(engine: Engine) -> None:
    """The same checks on any backend."""
    ledger = ConsentLedger(engine)
    assert current_revisions(engine) == head_revisions()
    ledger.append("u1", P, ConsentStatus.GIVEN, collection_method="signup_form", event_time=T0)
    ledger.append(
        "u1", P, "withdrawn", collection_method="settings_page", event_time=T0 + dt.timedelta(days=2)
    )
    ledger.append("u1", D, "given", collection_method="banner", event_time=T0 + dt.timedelta(days=1))
    ledger.append(
        "u1", P, "renewed", collection_method="banner", event_time=T0 + dt.timedelta(days=30)
    )  # future
    ledger.append("u2", P, "given", collection_method="banner", event_time=T0)

    at = T0 + dt.timedelta(days=3)
    state = ledger.state("u1", at)
    assert state.consent(P).status is ConsentStatus.WITHDRAWN and not state.consent(P).valid
    assert state.consent(D).valid
    assert state.consent(ConsentPurpose.MARKETING).status is ConsentStatus.UNKNOWN
    assert ledger.state("u1", T0 + dt.timedelta(hours=1)).consent(P).valid  # point in time
    assert ledger.state("u1", T0 + dt.timedelta(days=31)).consent(P).status is ConsentStatus.RENEWED
    assert ledger.state("u1", at).consent(P).event_time == T0 + dt.timedelta(days=2)

    # same instant: insertion order decides
    ledger.append("u3", P, "given", collection_method="x", event_time=T0)
    ledger.append("u3", P, "refused", collection_method="x", event_time=T0)
    assert ledger.state("u3", at).consent(P).status is ConsentStatus.REFUSED

    history = ledger.history("u1")
    assert [h["status"] for h in history] == ["given", "given", "withdrawn", "renewed"]
    assert history[0]["data_categories"] and history[0]["policy_version"]

    # restriction and objection are derived the same way
    ledger.record_control("u2", "restriction", active=True, collection_method="cli", event_time=T0)
    ledger.record_control(
        "u2", "objection", active=True, scope="fraud_detection", collection_method="cli", event_time=T0
    )
    s2 = ledger.state("u2", at)
    assert (
        s2.restricted
        and s2.objects_to("fraud_detection")
        and not s2.objects_to("personalised_recommendations")
    )
    ledger.record_control(
        "u2", "restriction", active=False, collection_method="cli", event_time=T0 + dt.timedelta(1)
    )
    assert not ledger.state("u2", at).restricted
    # several persons in one read (the API's batches) = each read alone
    together = ledger.states(["u3", "u1", "u2", "nobody"], at)
    assert together == {s: ledger.state(s, at) for s in ("u1", "u2", "u3", "nobody")}
    assert ledger.excluded_subjects("fraud_detection", at) == {"u2"}
    assert ledger.excluded_subjects("personalised_recommendations", at) == set()

    # history is never rewritten: not through the ORM, not through SQL
    with Session(engine) as session:
        record = session.query(ConsentRecord).filter_by(subject_id="u1").first()
        assert record is not None
        record.status = "given"
        with pytest.raises(LedgerError, match="append-only"):
            session.commit()
    with Session(engine) as session:
        record = session.query(ConsentRecord).filter_by(subject_id="u1").first()
        session.delete(record)
        with pytest.raises(LedgerError, match="append-only"):
            session.commit()
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text("UPDATE consent_ledger SET status = 'given' WHERE subject_id = 'u1'"))
    assert [h["status"] for h in ledger.history("u1")] == ["given", "given", "withdrawn", "renewed"]

    with pytest.raises(LedgerError):
        ledger.append("u1", "newsletter", "given", collection_method="x")
    with pytest.raises(ValueError, match="naive"):
        ledger.state("u1", dt.datetime(2025, 1, 1))


def test_ledger_on_sqlite(sqlite_engine: Engine) -> None:
    _exercise(sqlite_engine)


@pytest.mark.realserver
def test_ledger_on_postgresql(pg_engine: Engine) -> None:
    assert ConsentLedger(pg_engine)._state_sql_pg is not None  # the driver-level read is under test
    _exercise(pg_engine)
    with pg_engine.connect() as conn:  # the pooled connection went back in SQLAlchemy's default mode
        assert conn.connection.driver_connection.autocommit is False


def test_migrate_is_idempotent_and_matches_models(sqlite_engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    migrate(sqlite_engine)  # second run: nothing to do, no error
    with sqlite_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), target_metadata())
    ours = {"consent_ledger", "processing_controls", "erasure_tombstones"}
    relevant = [d for d in diff if _table_of(d) in ours]
    assert relevant == []


def _table_of(diff: object) -> str | None:
    """Table name of one alembic autogenerate diff entry (its shapes vary by kind)."""
    entry = diff[0] if isinstance(diff, list) else diff
    assert isinstance(entry, tuple)
    kind, *rest = entry
    if kind in {"add_table", "remove_table"}:
        return str(rest[0].name)
    if kind.endswith(("_index", "_constraint")):
        return str(rest[0].table.name)
    return str(rest[1])  # column and modify_* entries: (kind, schema, table, ...)


def _consent_events(n: int) -> pd.DataFrame:
    times = pd.date_range("2025-01-01", periods=n, freq="h", tz="UTC")
    return pd.DataFrame(
        {
            "receipt_id": [f"r{i}" for i in range(n)],
            "user_id": [f"u{i % 7}" for i in range(n)],
            "purpose": [list(ConsentPurpose)[i % 3].value for i in range(n)],
            "status": [["given", "withdrawn", "renewed", "refused"][i % 4] for i in range(n)],
            "event_time": times,
            "source": "signup_form",
            "policy_version": "2025-02-12",
            "jurisdiction": "EU",
        }
    )


def test_import_is_idempotent_and_state_matches_pandas(sqlite_engine: Engine, tmp_path: Path) -> None:
    events = _consent_events(200)
    write_table(events, tmp_path / "ev", "consent_events")
    ledger = ConsentLedger(sqlite_engine)
    first = ledger.import_events_dir(tmp_path / "ev")
    again = ledger.import_events_dir(tmp_path / "ev")
    assert (first.inserted, again.inserted, again.already_present) == (200, 0, 200)
    expected = events.sort_values("event_time").groupby(["user_id", "purpose"]).tail(1)
    at = events["event_time"].max().to_pydatetime()
    for row in expected.itertuples():
        assert ledger.state(row.user_id, at).consent(row.purpose).status.value == row.status
    frame = ledger.consent_frame(P)
    assert len(frame) == (events["purpose"] == P.value).sum()
    assert frame["event_time"].dt.tz is not None
