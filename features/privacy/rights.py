"""Data-subject rights as plain functions (the CLI and the HTTP API both call these).

Access and portability (Arts 15, 20): one JSON document with what the person provided,
what was observed about them, derived features, decisions and the consent history.
Restriction (Art 18) and objection (Art 21) are appended to the processing controls;
consent read and update go through the ledger (Art 7(3): withdrawing is as easy as giving).
Erasure is in `features.privacy.erasure`, retention in `features.privacy.retention`.
Authorisation (a person acts only on their own data) is the caller's job.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import Engine, select

from features.events import ConsentPurpose, ConsentStatus
from features.privacy.erasure import feature_store_config, person_payment_ids, service_tables
from features.privacy.inventory import INVENTORY, SUBJECT_COLUMNS
from features.privacy.ledger import ALL_SCOPES, ConsentLedger, LedgerError, now_utc
from features.privacy.registry import get_registry
from features.settings import Settings, get_settings

EXPORT_FORMAT = "aipic-subject-export/1"


def _records(table: pa.Table) -> list[dict[str, Any]]:
    """JSON-ready rows (timestamps as ISO 8601) through pandas' JSON writer."""
    if table.num_rows == 0:
        return []
    return list(json.loads(table.to_pandas().to_json(orient="records", date_format="iso")))


def offline_rows(subject_id: str, events_dir: Path) -> dict[str, dict[str, Any]]:
    """The person's rows of every inventoried event table, grouped by source."""
    out: dict[str, dict[str, Any]] = {"provided": {}, "observed": {}, "omitted": {}}
    payment_ids = person_payment_ids(subject_id, events_dir)
    for name, spec in INVENTORY.items():
        path = Path(events_dir) / f"{name}.parquet"
        if not path.exists():
            continue
        table = pq.read_table(path)
        if spec.subject_column and spec.subject_column in table.column_names:
            mask = pc.fill_null(pc.equal(table.column(spec.subject_column), subject_id), False)
        elif spec.linked_by and spec.linked_by in table.column_names:
            mask = pc.fill_null(pc.is_in(table.column(spec.linked_by), value_set=payment_ids), False)
        else:
            continue
        rows = table.filter(mask)
        omit = [c for c in spec.export_omit if c in rows.column_names]
        rows = rows.drop_columns(omit)
        out[spec.source][name] = _records(rows)
        for c in omit:
            out["omitted"][f"{name}.{c}"] = spec.export_omit[c]
    return out


def derived_features(subject_id: str, repo_dir: Path) -> dict[str, Any]:
    """The person's current online feature values (Feast views keyed by ``user_id`` only)."""
    if feature_store_config(repo_dir) is None:
        return {"available": False, "reason": "no feature repository has been built"}
    try:
        from feast import FeatureStore

        store = FeatureStore(repo_path=str(repo_dir))
        refs = [
            f"{fv.name}:{f.name}"
            for fv in store.list_feature_views()
            if set(fv.join_keys) == {"user_id"}
            for f in fv.features
        ]
        if not refs:
            return {"available": True, "values": {}}
        values = store.get_online_features(features=refs, entity_rows=[{"user_id": subject_id}]).to_dict()
    except Exception as exc:  # the export must still be delivered; say what is missing and why
        return {"available": False, "reason": f"online store not readable: {type(exc).__name__}"}
    return {"available": True, "values": {k: v[0] for k, v in values.items() if k != "user_id"}}


def service_records(subject_id: str, engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Rows about the person in service tables (decision logs with their explanations, reviews)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, table in sorted(service_tables(engine).items()):
        col = next((c for c in SUBJECT_COLUMNS if c in table.c), None)
        if col is None:
            continue
        with engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(select(table).where(table.c[col] == subject_id)).mappings()]
        out[name] = json.loads(json.dumps(rows, default=_json_default))
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def export_subject(
    subject_id: str,
    *,
    ledger: ConsentLedger | None = None,
    settings: Settings | None = None,
    events_dir: Path | None = None,
    repo_dir: Path | None = None,
    include_online: bool = True,
) -> dict[str, Any]:
    """Everything held about the person, as one JSON-ready document (access + portability)."""
    s = settings or get_settings()
    led = ledger or ConsentLedger()
    events = Path(events_dir or s.events_dir)
    offline = offline_rows(subject_id, events)
    return {
        "format": EXPORT_FORMAT,
        "subject_id": subject_id,
        "generated_at": now_utc().isoformat(),
        "controller": "INRO EXPORT Ltd (AIpicMarket), privacy policy version " + s.policy_version,
        "provided": offline["provided"],
        "observed": offline["observed"],
        "derived_features": (
            derived_features(subject_id, Path(repo_dir or s.feature_repo_dir))
            if include_online
            else {"available": False, "reason": "not requested"}
        ),
        "decisions_and_other_records": service_records(subject_id, led.engine),
        "consent": {
            "current": led.state(subject_id).snapshot(),
            "history": led.history(subject_id),
            "restrictions_and_objections": led.controls(subject_id),
        },
        "omitted": offline["omitted"],
    }


def get_consent(subject_id: str, ledger: ConsentLedger, at: dt.datetime | None = None) -> dict[str, Any]:
    return {"current": ledger.state(subject_id, at).snapshot(), "history": ledger.history(subject_id)}


def set_consent(
    subject_id: str,
    purpose: str,
    status: str,
    ledger: ConsentLedger,
    *,
    collection_method: str,
    jurisdiction: str = "EU",
    event_time: dt.datetime | None = None,
) -> str:
    """Record a new consent status (given, renewed, refused, withdrawn, ...); returns the receipt id."""
    try:
        p, st = ConsentPurpose(purpose), ConsentStatus(status)
    except ValueError:
        raise LedgerError(
            f"purpose must be one of {[c.value for c in ConsentPurpose]} and status one of "
            f"{[c.value for c in ConsentStatus]}"
        ) from None
    return ledger.append(
        subject_id,
        p,
        st,
        collection_method=collection_method,
        jurisdiction=jurisdiction,
        event_time=event_time,
    )


def restrict(
    subject_id: str,
    ledger: ConsentLedger,
    *,
    lift: bool = False,
    collection_method: str,
    reason_code: str | None = None,
) -> str:
    """Start (or lift) a restriction of processing: from now on the person is not profiled."""
    return ledger.record_control(
        subject_id,
        "restriction",
        active=not lift,
        collection_method=collection_method,
        reason_code=reason_code,
    )


def object_to(
    subject_id: str,
    purpose: str,
    ledger: ConsentLedger,
    *,
    withdraw: bool = False,
    collection_method: str,
    reason_code: str | None = None,
) -> str:
    """Record an objection to ``purpose`` (or ``*`` for all) or its withdrawal."""
    if purpose != ALL_SCOPES:
        get_registry().purpose(purpose)  # clear error for an unknown purpose
    return ledger.record_control(
        subject_id,
        "objection",
        active=not withdraw,
        scope=purpose,
        collection_method=collection_method,
        reason_code=reason_code,
    )
