"""The consent ledger: append-only records from which the current state is derived.

Three tables on `features.db.Base` (created by the Alembic migration, never by
``create_all``):

- ``consent_ledger``: one row per consent event (Kantara consent receipt / ISO/IEC TS 27560
  fields: receipt id, subject, purpose, DPV status, time, collection method, policy version,
  jurisdiction and the data categories the consent covers).
- ``processing_controls``: restriction (Art 18) and objection (Art 21) start/lift events.
- ``erasure_tombstones``: the minimal proof kept after an erasure (Art 5(2), Art 17).

History is never rewritten: the ORM refuses updates and deletes of these rows and the
database refuses UPDATE with a trigger. Rows leave only through `features.privacy.erasure`
and `features.privacy.retention`. The current state is the latest record per subject and
purpose at the asked time (ties broken by insertion order); it is read from the database on
every call, never cached, so a withdrawal takes effect on the very next request.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Engine,
    Index,
    String,
    Text,
    any_,
    bindparam,
    cast,
    event,
    insert,
    literal_column,
    null,
    select,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.selectable import CompoundSelect

from features.db import Base, engine_for, on_driver_cursor, on_psycopg, retry_if_connection_died
from features.events import VALID_CONSENT, ConsentPurpose, ConsentStatus
from features.privacy.registry import CONSENT_SCOPES
from features.privacy.sqltypes import BigId, UTCDateTime, as_utc

CONSENT_STATUSES = tuple(s.value for s in ConsentStatus)
CONTROL_KINDS = ("restriction", "objection")
ALL_SCOPES = "*"


class LedgerError(ValueError):
    """A ledger operation was refused (history rewrite, bad value). The message says why."""


class ConsentRecord(Base):
    __tablename__ = "consent_ledger"
    __table_args__ = (
        Index("ix_consent_ledger_subject_purpose_time", "subject_id", "purpose", "event_time"),
        CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in CONSENT_STATUSES)),
            name="ck_consent_ledger_status",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    receipt_id: Mapped[str] = mapped_column(String(64), unique=True)
    subject_id: Mapped[str] = mapped_column(String(128))
    purpose: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    event_time: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    collection_method: Mapped[str] = mapped_column(String(64))
    policy_version: Mapped[str] = mapped_column(String(32))
    jurisdiction: Mapped[str] = mapped_column(String(16))
    data_categories: Mapped[list[str]] = mapped_column(JSON)
    recorded_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class ProcessingControl(Base):
    __tablename__ = "processing_controls"
    __table_args__ = (
        Index("ix_processing_controls_subject_time", "subject_id", "event_time"),
        CheckConstraint("kind IN ('restriction', 'objection')", name="ck_processing_controls_kind"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    receipt_id: Mapped[str] = mapped_column(String(64), unique=True)
    subject_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean)
    scope: Mapped[str] = mapped_column(String(64))
    event_time: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    collection_method: Mapped[str] = mapped_column(String(64))
    reason_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    recorded_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class ErasureTombstone(Base):
    __tablename__ = "erasure_tombstones"
    __table_args__ = (Index("ix_erasure_tombstones_subject", "subject_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    receipt_id: Mapped[str] = mapped_column(String(64), unique=True)
    subject_id: Mapped[str] = mapped_column(String(128))
    erased_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    retain_until: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    legal_basis: Mapped[str] = mapped_column(Text)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)


APPEND_ONLY_MODELS = (ConsentRecord, ProcessingControl, ErasureTombstone)


def _refuse_rewrite(_mapper: Any, _conn: Any, target: Any) -> None:
    raise LedgerError(f"{type(target).__tablename__} is append-only: history is never rewritten")


for _model in APPEND_ONLY_MODELS:
    event.listen(_model, "before_update", _refuse_rewrite)
    event.listen(_model, "before_delete", _refuse_rewrite)


# --- derived state -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsentState:
    """The latest consent record for one purpose, or ``unknown`` if there is none."""

    purpose: str
    status: ConsentStatus
    receipt_id: str | None = None
    event_time: dt.datetime | None = None
    policy_version: str | None = None

    @property
    def valid(self) -> bool:
        return self.status in VALID_CONSENT


@dataclass(frozen=True)
class SubjectState:
    """Everything the gate needs about a person at one instant."""

    subject_id: str
    at: dt.datetime
    consents: Mapping[str, ConsentState]
    restricted: bool = False
    objections: frozenset[str] = field(default_factory=frozenset)

    def consent(self, purpose: ConsentPurpose | str) -> ConsentState:
        key = ConsentPurpose(purpose).value
        return self.consents.get(key, ConsentState(key, ConsentStatus.UNKNOWN))

    def objects_to(self, purpose: str) -> bool:
        return ALL_SCOPES in self.objections or purpose in self.objections

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready record of the state used for a decision (goes into the decision log)."""
        consents = {}
        for p in ConsentPurpose:
            c = self.consent(p)
            consents[p.value] = {
                "status": c.status.value,
                "valid": c.valid,
                "receipt_id": c.receipt_id,
                "event_time": c.event_time.isoformat() if c.event_time else None,
                "policy_version": c.policy_version,
            }
        return {
            "subject_id": self.subject_id,
            "at": self.at.isoformat(),
            "consents": consents,
            "restricted": self.restricted,
            "objections": sorted(self.objections),
        }


@dataclass(frozen=True)
class ImportReport:
    inserted: int
    already_present: int
    skipped_erased: int


# Built once: the gate reads state on every request, so statement construction is kept off the hot
# path. One statement (consents and controls in a UNION ALL) and one round trip: the state is one
# consistent snapshot, read fresh every time. The API reads the persons of a batch of requests at
# once; a lone read is a batch of one.
def _state_statement(subjects: Callable[[Any], Any]) -> CompoundSelect:
    """Consent records and processing controls of the persons ``subjects(column)`` selects."""
    return union_all(
        select(
            literal_column("0").label("src"),
            ConsentRecord.subject_id.label("subject"),
            ConsentRecord.purpose.label("name"),
            ConsentRecord.status.label("value"),
            ConsentRecord.receipt_id,
            ConsentRecord.event_time,
            ConsentRecord.policy_version,
            cast(null(), Boolean).label("active"),
            ConsentRecord.id,
        ).where(
            subjects(ConsentRecord.subject_id),
            ConsentRecord.event_time <= bindparam("at", type_=UTCDateTime),
        ),
        select(
            literal_column("1"),
            ProcessingControl.subject_id,
            ProcessingControl.kind,
            ProcessingControl.scope,
            cast(null(), String),
            ProcessingControl.event_time,
            cast(null(), String),
            ProcessingControl.active,
            ProcessingControl.id,
        ).where(
            subjects(ProcessingControl.subject_id),
            ProcessingControl.event_time <= bindparam("at", type_=UTCDateTime),
        ),
    ).order_by(literal_column("src"), literal_column("event_time"), literal_column("id"))


# Any database: an expanding IN (its SQL text changes with the number of persons).
_STATE = _state_statement(lambda column: column.in_(bindparam("subjects", expanding=True)))
# PostgreSQL: one array parameter, so one SQL text that psycopg prepares once per connection.
_STATE_PG = _state_statement(lambda column: column == any_(bindparam("subjects", type_=ARRAY(String))))


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ConsentLedger:
    """Append and read consent and processing-control records on one database."""

    def __init__(self, engine: Engine | str | None = None) -> None:
        if engine is None:
            from features.db import get_engine

            engine = get_engine()
        self.engine = engine_for(engine) if isinstance(engine, str) else engine
        self._state_sql_pg = (
            str(_STATE_PG.compile(dialect=self.engine.dialect)) if on_psycopg(self.engine) else None
        )

    # -- writing ----------------------------------------------------------------------------------
    def append(
        self,
        subject_id: str,
        purpose: ConsentPurpose | str,
        status: ConsentStatus | str,
        *,
        collection_method: str,
        event_time: dt.datetime | None = None,
        policy_version: str | None = None,
        jurisdiction: str = "EU",
        receipt_id: str | None = None,
    ) -> str:
        """Append one consent record; return its receipt id."""
        try:
            p, s = ConsentPurpose(purpose), ConsentStatus(status)
        except ValueError as exc:
            raise LedgerError(str(exc)) from None
        if not subject_id:
            raise LedgerError("subject id must not be empty")
        from features.settings import get_settings

        row = {
            "receipt_id": receipt_id or f"cr-{uuid.uuid4()}",
            "subject_id": subject_id,
            "purpose": p.value,
            "status": s.value,
            "event_time": as_utc(event_time or now_utc()),
            "collection_method": collection_method,
            "policy_version": policy_version or get_settings().policy_version,
            "jurisdiction": jurisdiction,
            "data_categories": list(CONSENT_SCOPES.get(p, ())),
            "recorded_at": now_utc(),
        }
        with self.engine.begin() as conn:
            conn.execute(insert(ConsentRecord), [row])
        return str(row["receipt_id"])

    def record_control(
        self,
        subject_id: str,
        kind: str,
        *,
        active: bool,
        scope: str = ALL_SCOPES,
        collection_method: str,
        event_time: dt.datetime | None = None,
        reason_code: str | None = None,
    ) -> str:
        """Append a restriction or objection start (active) or lift; return its receipt id."""
        if kind not in CONTROL_KINDS:
            raise LedgerError(f"unknown control {kind!r}; known: {CONTROL_KINDS}")
        receipt = f"pc-{uuid.uuid4()}"
        with self.engine.begin() as conn:
            conn.execute(
                insert(ProcessingControl),
                [
                    {
                        "receipt_id": receipt,
                        "subject_id": subject_id,
                        "kind": kind,
                        "active": active,
                        "scope": scope,
                        "event_time": as_utc(event_time or now_utc()),
                        "collection_method": collection_method,
                        "reason_code": reason_code,
                        "recorded_at": now_utc(),
                    }
                ],
            )
        return receipt

    def import_frame(self, events: pd.DataFrame, *, chunk: int = 5000) -> ImportReport:
        """Append consent events (the ``consent_events`` table layout); idempotent on receipt id.

        Subjects with an erasure tombstone are skipped so a re-import cannot bring them back.
        """
        if events.empty:
            return ImportReport(0, 0, 0)
        with self.engine.connect() as conn:
            existing = set(conn.execute(select(ConsentRecord.receipt_id)).scalars())
            erased = set(conn.execute(select(ErasureTombstone.subject_id)).scalars())
        is_new = ~events["receipt_id"].isin(existing)
        not_erased = ~events["user_id"].isin(erased)
        todo = events[is_new & not_erased].drop_duplicates("receipt_id")
        scopes = {p.value: list(s) for p, s in CONSENT_SCOPES.items()}
        times = pd.to_datetime(todo["event_time"], utc=True)
        frame = pd.DataFrame(
            {
                "receipt_id": todo["receipt_id"].astype(str),
                "subject_id": todo["user_id"].astype(str),
                "purpose": todo["purpose"].astype(str),
                "status": todo["status"].astype(str),
                "event_time": times,  # pandas Timestamps are datetimes: bound as UTC by UTCDateTime
                "collection_method": todo["source"].astype(str),
                "policy_version": todo["policy_version"].astype(str),
                "jurisdiction": todo["jurisdiction"].astype(str),
            }
        )
        bad = set(frame["status"]) - set(CONSENT_STATUSES) | set(frame["purpose"]) - set(scopes)
        if bad:
            raise LedgerError(f"unknown consent purposes/statuses in import: {sorted(bad)[:5]}")
        frame["data_categories"] = frame["purpose"].map(scopes)
        frame["recorded_at"] = now_utc()
        rows: list[dict[str, Any]] = [{str(k): v for k, v in r.items()} for r in frame.to_dict("records")]
        with self.engine.begin() as conn:
            for start in range(0, len(rows), chunk):
                conn.execute(insert(ConsentRecord), rows[start : start + chunk])
        return ImportReport(
            inserted=len(rows),
            already_present=int((~is_new).sum()),
            skipped_erased=int((is_new & ~not_erased).sum()),
        )

    def import_events_dir(self, events_dir: Path) -> ImportReport:
        """Import ``consent_events.parquet`` written by the simulator or an importer."""
        from features.storage import read_table

        return self.import_frame(read_table(events_dir, "consent_events"))

    # -- reading ----------------------------------------------------------------------------------
    def state(self, subject_id: str, at: dt.datetime | None = None) -> SubjectState:
        """Derive the person's consents, restriction and objections at ``at`` (default now)."""
        return self.states([subject_id], at)[subject_id]

    def states(self, subject_ids: Sequence[str], at: dt.datetime | None = None) -> dict[str, SubjectState]:
        """`state` of several persons at the same ``at``, in one query (the API's request batches)."""
        when = as_utc(at or now_utc())
        wanted = sorted(set(subject_ids))
        rows = self._state_rows({"subjects": wanted, "at": when}) if wanted else []
        consents: dict[str, dict[str, ConsentState]] = {s: {} for s in wanted}
        latest: dict[str, dict[tuple[str, str], bool]] = {s: {} for s in wanted}
        for src, subject, name, value, receipt, time, policy, active, _id in rows:  # rows in time order
            if int(src) == 0:  # consent record: the latest per purpose wins
                consents[subject][name] = ConsentState(name, ConsentStatus(value), receipt, time, policy)
            else:  # processing control: the latest per (kind, scope) wins
                latest[subject][(name, value)] = bool(active)
        out = {}
        for s in wanted:
            controls = latest[s]
            restricted = any(active for (kind, _), active in controls.items() if kind == "restriction")
            objections = frozenset(
                scope for (kind, scope), active in controls.items() if kind == "objection" and active
            )
            out[s] = SubjectState(s, when, consents[s], restricted, objections)
        return out

    def _state_rows(self, params: dict[str, Any]) -> list[Any]:
        """One autocommit read (a lone SELECT needs no BEGIN/ROLLBACK round trips around it).

        On PostgreSQL (psycopg) straight on the driver (`features.db.on_driver_cursor`) with the
        statement compiled once. Engines without a ping per checkout find a dead connection by
        using it: the pool is discarded and the read is tried once more on a fresh connection.
        """
        if self._state_sql_pg is not None:
            sql = self._state_sql_pg

            def read(cur: Any) -> list[Any]:
                cur.execute(sql, {"subjects": params["subjects"], "at": as_utc(params["at"])})
                return [(*r[:5], as_utc(r[5]), *r[6:]) for r in cur.fetchall()]

            return on_driver_cursor(self.engine, read)

        def read_autocommit() -> list[Any]:
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                return list(conn.execute(_STATE, params).all())

        return retry_if_connection_died(read_autocommit)

    def history(self, subject_id: str) -> list[dict[str, Any]]:
        """Every consent record of the person, oldest first (for access requests)."""
        return self._rows(ConsentRecord, subject_id)

    def controls(self, subject_id: str) -> list[dict[str, Any]]:
        return self._rows(ProcessingControl, subject_id)

    def tombstones(self, subject_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ErasureTombstone).where(ErasureTombstone.subject_id == subject_id)
            ).mappings()
            return [_jsonable(r) for r in (dict(x) for x in rows)]

    def consent_frame(self, purpose: ConsentPurpose | str | None = None) -> pd.DataFrame:
        """All consent records as a frame in the ``consent_events`` layout (for training)."""
        stmt = select(
            ConsentRecord.receipt_id,
            ConsentRecord.subject_id.label("user_id"),
            ConsentRecord.purpose,
            ConsentRecord.status,
            ConsentRecord.event_time,
        ).order_by(ConsentRecord.event_time, ConsentRecord.id)
        if purpose is not None:
            stmt = stmt.where(ConsentRecord.purpose == ConsentPurpose(purpose).value)
        with self.engine.connect() as conn:
            df = pd.DataFrame(
                conn.execute(stmt).all(), columns=["receipt_id", "user_id", "purpose", "status", "event_time"]
            )
        df["event_time"] = pd.to_datetime(df["event_time"], utc=True)
        return df

    def excluded_subjects(self, purpose: str, at: dt.datetime | None = None) -> set[str]:
        """Subjects restricted, or objecting to ``purpose`` (or to everything), at ``at``."""
        when = as_utc(at or now_utc())
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    ProcessingControl.subject_id,
                    ProcessingControl.kind,
                    ProcessingControl.scope,
                    ProcessingControl.active,
                    ProcessingControl.event_time,
                    ProcessingControl.id,
                ).where(ProcessingControl.event_time <= when)
            ).all()
        if not rows:
            return set()
        df = pd.DataFrame(rows, columns=["subject_id", "kind", "scope", "active", "event_time", "id"])
        latest = df.sort_values(["event_time", "id"]).groupby(["subject_id", "kind", "scope"]).tail(1)
        hit = latest["active"].astype(bool) & (
            (latest["kind"] == "restriction") | latest["scope"].isin([ALL_SCOPES, purpose])
        )
        return set(latest.loc[hit, "subject_id"])

    def _rows(
        self, model: type[ConsentRecord] | type[ProcessingControl], subject_id: str
    ) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(model.__table__)
                .where(model.subject_id == subject_id)
                .order_by(model.event_time, model.id)
            ).mappings()
            return [_jsonable(dict(r)) for r in rows]


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}


def consent_scope(purposes: Iterable[ConsentPurpose]) -> dict[str, list[str]]:
    """The categories each consent covers (for consent forms and exports)."""
    return {p.value: list(CONSENT_SCOPES.get(p, ())) for p in purposes}
