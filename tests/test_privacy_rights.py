"""Data-subject rights: export, erasure from every store (parquet, ledger, service tables,
Feast SQLite and real Redis online stores), restriction, objection, retention, CLI."""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from sqlalchemy import MetaData, Table, insert, select, text
from typer.testing import CliRunner

from features.events import ConsentPurpose
from features.migrations import migrate
from features.privacy.erasure import erase_subject, linked_entity_values
from features.privacy.ledger import ConsentLedger
from features.privacy.retention import enforce_retention, retention_days
from features.privacy.rights import export_subject, object_to, restrict
from features.settings import get_settings
from features.storage import read_table, write_table

pytestmark = pytest.mark.consent

IN_CI = os.environ.get("CI", "").lower() == "true"
NOW = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)


def ts(days_ago: float) -> pd.Timestamp:
    return pd.Timestamp(NOW - dt.timedelta(days=days_ago))


def make_events(directory: Path) -> None:
    """A tiny marketplace: u1 (to be erased) shares device d-shared with u2; d-u1 is u1's alone."""
    write_table(
        pd.DataFrame(
            {
                "user_id": ["u1", "u2"],
                "signup_time": [ts(400), ts(300)],
                "date_of_birth": [dt.date(1990, 1, 1), dt.date(1985, 5, 5)],
                "country": ["BG", "DE"],
                "kyc_status": ["verified", "none"],
                "is_guest": [False, False],
            }
        ),
        directory,
        "users",
    )
    write_table(
        pd.DataFrame(
            {
                "creator_id": ["c1", "c2"],
                "user_id": ["u1", None],
                "joined_time": [ts(350), ts(350)],
                "country": ["BG", "FR"],
            }
        ),
        directory,
        "creators",
    )
    inter = [
        ("e1", "u1", "i1", 10, "d-u1", "10.0.0.1"),
        ("e2", "u1", "i2", 200, "d-shared", "10.0.0.9"),
        ("e3", "u2", "i1", 5, "d-shared", "10.0.0.9"),
        ("e4", "u2", "i2", 800, "d-u2", "10.0.0.2"),
    ]
    write_table(
        pd.DataFrame(
            {
                "event_id": [r[0] for r in inter],
                "user_id": [r[1] for r in inter],
                "item_id": [r[2] for r in inter],
                "event_type": "view",
                "event_time": [ts(r[3]) for r in inter],
                "session_id": ["s"] * 4,
                "device_id": [r[4] for r in inter],
                "ip": [r[5] for r in inter],
                "ip_country": ["BG"] * 4,
                "quantity": 1,
            }
        ),
        directory,
        "interactions",
    )
    pays = [
        ("p1", "u1", 3, "card-u1", "d-u1"),
        ("p2", "u2", 4, "card-u2", "d-shared"),
        ("p3", "u2", 4000, "card-u2", "d-u2"),
    ]
    write_table(
        pd.DataFrame(
            {
                "payment_id": [p[0] for p in pays],
                "user_id": [p[1] for p in pays],
                "item_ids": [["i1"]] * 3,
                "payment_time": [ts(p[2]) for p in pays],
                "kind": "purchase",
                "amount": 10.0,
                "currency": "EUR",
                "card_fingerprint": [p[3] for p in pays],
                "card_bin_country": "BG",
                "billing_country": "BG",
                "device_id": [p[4] for p in pays],
                "ip": "10.0.0.5",
                "ip_country": "BG",
                "creator_id": "c2",
                "fraud_pattern": [None, "none", None],
            }
        ),
        directory,
        "payments",
    )
    write_table(
        pd.DataFrame(
            {
                "dispute_id": ["x1", "x2"],
                "payment_id": ["p1", "p2"],
                "reason": "fraud",
                "reported_time": [ts(1), ts(2)],
            }
        ),
        directory,
        "disputes",
    )
    consent = [
        ("r1", "u1", "personalised_recommendations", "given", 30),
        ("r2", "u2", "personalised_recommendations", "given", 3000),
        ("r3", "u2", "personalised_recommendations", "withdrawn", 2500),
        ("r4", "u2", "marketing", "given", 2400),
    ]
    write_table(
        pd.DataFrame(
            {
                "receipt_id": [c[0] for c in consent],
                "user_id": [c[1] for c in consent],
                "purpose": [c[2] for c in consent],
                "status": [c[3] for c in consent],
                "event_time": [ts(c[4]) for c in consent],
                "source": "signup_form",
                "policy_version": "2025-02-12",
                "jurisdiction": "EU",
            }
        ),
        directory,
        "consent_events",
    )


def make_feast_repo(repo: Path, project: str, online: dict[str, Any]) -> Any:
    """A real Feast repo: user, device and user×item views, materialised for u1 and u2."""
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64

    repo.mkdir(parents=True, exist_ok=True)
    config = {
        "project": project,
        "registry": str(repo / "registry.db"),
        "provider": "local",
        "online_store": online,
        "offline_store": {"type": "duckdb"},
        "entity_key_serialization_version": 3,
    }
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(config))
    src_path = repo / "source.parquet"
    pd.DataFrame({"user_id": ["u0"], "event_timestamp": [ts(1)], "x": [0.0]}).to_parquet(src_path)
    src = FileSource(path=str(src_path), timestamp_field="event_timestamp")
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING)
    device = Entity(name="device", join_keys=["device_id"], value_type=ValueType.STRING)
    views = {
        "user_stats": FeatureView(
            name="user_stats", entities=[user], schema=[Field(name="views_7d", dtype=Float64)], source=src
        ),
        "user_item": FeatureView(
            name="user_item",
            entities=[user, item],
            schema=[Field(name="affinity", dtype=Float64)],
            source=src,
        ),
        "device_stats": FeatureView(
            name="device_stats",
            entities=[device],
            schema=[Field(name="users_30d", dtype=Float64)],
            source=src,
        ),
    }
    store = FeatureStore(repo_path=str(repo))
    store.apply([user, item, device, *views.values()])
    now = pd.Timestamp(dt.datetime.now(dt.UTC))
    frames = {
        "user_stats": pd.DataFrame({"user_id": ["u1", "u2"], "views_7d": [3.0, 4.0]}),
        "user_item": pd.DataFrame(
            {"user_id": ["u1", "u1", "u2"], "item_id": ["i1", "u2", "i1"], "affinity": [0.1, 0.2, 0.3]}
        ),
        "device_stats": pd.DataFrame(
            {"device_id": ["d-u1", "d-shared", "d-u2"], "users_30d": [1.0, 2.0, 1.0]}
        ),
    }
    for name, frame in frames.items():
        frame["event_timestamp"] = now
        store.write_to_online_store(name, frame)
    return store


def online_values(store: Any) -> dict[str, list[Any]]:
    return {
        "u_views": store.get_online_features(
            ["user_stats:views_7d"], [{"user_id": "u1"}, {"user_id": "u2"}]
        ).to_dict()["views_7d"],
        "ui": store.get_online_features(
            ["user_item:affinity"],
            [
                {"user_id": "u1", "item_id": "i1"},
                {"user_id": "u1", "item_id": "u2"},
                {"user_id": "u2", "item_id": "i1"},
            ],
        ).to_dict()["affinity"],
        "dev": store.get_online_features(
            ["device_stats:users_30d"],
            [{"device_id": "d-u1"}, {"device_id": "d-shared"}, {"device_id": "d-u2"}],
        ).to_dict()["users_30d"],
    }


def _decision(decision_id: str, subject: str) -> dict[str, Any]:
    return {
        "id": decision_id,
        "subject_id": subject,
        "kind": "payment_score",
        "purpose": "fraud_detection",
        "tier": "full",
        "degraded": False,
        "feature_names": ["amount"],
        "vectors": [[10.0]],
        "raw_scores": [0.1],
        "outcome": "approve",
        "source": "automated",
        "human_review_required": False,
        "consent_snapshot": {},
        "output": {"explanation": "low risk"},
        "created_at": ts(31).to_pydatetime(),
    }


def _review(review_id: str, decision_id: str, subject: str) -> dict[str, Any]:
    return {
        "id": review_id,
        "decision_id": decision_id,
        "subject_id": subject,
        "origin": "person",
        "status": "open",
        "requested_at": ts(30).to_pydatetime(),
    }


@pytest.fixture
def world(isolated_settings: Path) -> Iterator[dict[str, Any]]:
    """Events, a migrated service DB with a decision-log-like table, and a consent ledger."""
    s = get_settings()
    make_events(s.events_dir)
    from features.db import get_engine

    engine = get_engine()
    migrate(engine)  # the ledger and every later revision (decision log, reviews, ...)
    meta = MetaData()
    decisions = Table("decision_log", meta, autoload_with=engine)
    reviews = Table("decision_reviews", meta, autoload_with=engine)
    with engine.begin() as conn:
        conn.execute(insert(decisions), [_decision("d1", "u1"), _decision("d2", "u2")])
        conn.execute(insert(reviews), [_review("r-1", "d1", "u1"), _review("r-2", "d2", "u2")])
    ledger = ConsentLedger(engine)
    ledger.import_events_dir(s.events_dir)
    yield {"settings": s, "engine": engine, "ledger": ledger}


def _contains_u1(directory: Path) -> list[str]:
    hits = []
    for path in directory.rglob("*.parquet"):
        table = pq.read_table(path)
        for col in ("user_id",):
            if col in table.column_names and "u1" in table.column(col).to_pylist():
                hits.append(path.name)
    return hits


def test_linked_keys_are_only_the_persons_own(world: dict[str, Any]) -> None:
    keys = linked_entity_values("u1", world["settings"].events_dir)
    assert keys["user_id"] == {"u1"}
    assert keys["device_id"] == {"d-u1"}  # d-shared is also u2's: not u1's alone
    assert keys["card_fingerprint"] == {"card-u1"}
    assert keys["ip"] == {"10.0.0.1"}


def test_export_contains_every_kind_of_data(world: dict[str, Any]) -> None:
    ledger: ConsentLedger = world["ledger"]
    restrict("u1", ledger, collection_method="test")
    doc = export_subject("u1", ledger=ledger)
    json.dumps(doc)  # serialisable as is
    assert [r["user_id"] for r in doc["provided"]["users"]] == ["u1"]
    assert [r["receipt_id"] for r in doc["provided"]["consent_events"]] == ["r1"]
    assert sorted(r["event_id"] for r in doc["observed"]["interactions"]) == ["e1", "e2"]
    assert [r["payment_id"] for r in doc["observed"]["payments"]] == ["p1"]
    assert (
        "fraud_pattern" not in doc["observed"]["payments"][0] and "payments.fraud_pattern" in doc["omitted"]
    )
    assert [r["dispute_id"] for r in doc["observed"]["disputes"]] == ["x1"]
    assert [r["id"] for r in doc["decisions_and_other_records"]["decision_log"]] == ["d1"]
    assert [r["id"] for r in doc["decisions_and_other_records"]["decision_reviews"]] == ["r-1"]
    assert doc["decisions_and_other_records"]["decision_log"][0]["output"] == {"explanation": "low risk"}
    assert doc["consent"]["current"]["consents"]["personalised_recommendations"]["status"] == "given"
    assert doc["consent"]["current"]["restricted"] is True
    assert doc["derived_features"]["available"] is False
    assert "u2" not in json.dumps({k: v for k, v in doc.items() if k != "omitted"})


def test_erasure_removes_the_person_everywhere_sqlite_online(world: dict[str, Any]) -> None:
    s = world["settings"]
    store = make_feast_repo(
        s.feature_repo_dir, f"p{uuid.uuid4().hex[:8]}", {"type": "sqlite", "path": "online.db"}
    )
    before = online_values(store)
    assert before["u_views"] == [3.0, 4.0] and before["ui"] == [0.1, 0.2, 0.3]
    offline_copy = s.feature_repo_dir / "data" / "user_features.parquet"  # a derived offline table
    offline_copy.parent.mkdir(parents=True)
    pd.DataFrame({"user_id": ["u1", "u2"], "f": [1.0, 2.0]}).to_parquet(offline_copy)

    report = erase_subject("u1", engine=world["engine"])
    assert report.ledger == {"consent_ledger": 1, "processing_controls": 0}
    assert report.service_tables == {"decision_reviews": 1, "decision_log": 1}

    after = online_values(store)
    assert after["u_views"] == [None, 4.0]
    assert after["ui"] == [None, None, 0.3]  # compound keys too, and "u2" as an item id of u1 is gone
    assert after["dev"] == [None, 2.0, 1.0]  # u1's own device gone, shared and others' kept
    # raw check of the SQLite file: no entity key holds u1 any more
    import sqlite3

    with sqlite3.connect(s.feature_repo_dir / "online.db") as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        blobs = [bytes(k) for t in tables for (k,) in conn.execute(f'SELECT entity_key FROM "{t}"')]
    assert blobs and not [b for b in blobs if b"\x02\x00\x00\x00\x02\x00\x00\x00u1" in b]

    assert _contains_u1(s.data_dir) == [] and _contains_u1(s.feature_repo_dir) == []
    assert read_table(s.events_dir, "creators")["user_id"].isna().tolist() == [
        True,
        True,
    ]  # unlinked, shop kept
    assert read_table(s.events_dir, "disputes")["dispute_id"].tolist() == ["x2"]
    assert read_table(s.events_dir, "payments")["payment_id"].tolist() == ["p2", "p3"]
    assert len(read_table(s.events_dir, "interactions")) == 2
    ledger: ConsentLedger = world["ledger"]
    assert ledger.history("u1") == [] and ledger.history("u2")
    tomb = ledger.tombstones("u1")
    assert len(tomb) == 1 and "Art 17" in tomb[0]["legal_basis"] and tomb[0]["summary"]["offline_rows"] > 0
    with world["engine"].connect() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM decision_log WHERE subject_id = 'u1'")).scalar_one() == 0
        )
        assert conn.execute(text("SELECT count(*) FROM decision_reviews")).scalar_one() == 1
    # a re-import of an old consent file cannot bring the person back
    old = pd.DataFrame(
        [
            {
                "receipt_id": "r1",
                "user_id": "u1",
                "purpose": "personalised_recommendations",
                "status": "given",
                "event_time": ts(30),
                "source": "x",
                "policy_version": "v",
                "jurisdiction": "EU",
            }
        ]
    )
    assert ledger.import_frame(old).skipped_erased == 1 and ledger.history("u1") == []
    # running it again is harmless (idempotent)
    again = erase_subject("u1", engine=world["engine"])
    assert again.offline == {} and again.service_tables == {} and sum(again.online.values()) == 0


def test_erasure_removes_the_person_from_the_online_event_state(world: dict[str, Any]) -> None:
    from features.events import Payment
    from features.online import OnlineFeatures, load_state, online_payment_vector
    from features.store import apply_repo, open_feature_store

    s = world["settings"]
    store = open_feature_store(s)
    apply_repo(store, s)
    online = OnlineFeatures(s, store=store)
    probe = Payment.model_validate(  # a later payment of u2 with u1's card: its card log is u1's p1
        {
            "payment_id": "probe",
            "user_id": "u2",
            "item_ids": [],
            "payment_time": NOW,
            "kind": "purchase",
            "amount": 10.0,
            "currency": "EUR",
            "card_fingerprint": "card-u1",
            "card_bin_country": None,
            "billing_country": None,
            "device_id": None,
            "ip": None,
            "ip_country": None,
            "creator_id": "c2",
        }
    )
    try:
        load_state(online, s.events_dir)
        assert online.state.payment_routes(["p1", "p2"]).keys() == {"p1", "p2"}
        assert online_payment_vector(online, probe)["card_count_30d"] == 2.0

        report = erase_subject("u1", engine=world["engine"])
        assert report.online["state"] > 0
        assert online.state.payment_routes(["p1", "p2"]).keys() == {"p2"}  # u1's payment left the index
        vec = online_payment_vector(online, probe)
        assert vec["card_count_30d"] == 1.0 and vec["creator_distinct_buyers_30d"] == 1.0
        assert erase_subject("u1", engine=world["engine"]).online["state"] == 0  # idempotent
    finally:
        online.close()


@pytest.mark.realserver
def test_erasure_from_real_redis(world: dict[str, Any]) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        if IN_CI:
            pytest.fail(f"Redis not reachable in CI: {exc}")
        pytest.skip("Redis not reachable")
    s = world["settings"]
    project = f"p{uuid.uuid4().hex[:10]}"
    store = make_feast_repo(
        s.feature_repo_dir, project, {"type": "redis", "connection_string": "127.0.0.1:6379,db=0"}
    )
    try:
        suffix = project.encode()
        keys_before = [k for k in client.scan_iter(match=b"*" + suffix, count=1000)]
        assert len(keys_before) == 8  # 2 user + 3 user×item + 3 device hashes
        assert online_values(store)["u_views"] == [3.0, 4.0]

        report = erase_subject("u1", engine=world["engine"])
        assert report.online == {"redis": 4}  # user u1, (u1,i1), (u1,u2), device d-u1

        after = online_values(store)
        assert after["u_views"] == [None, 4.0] and after["ui"] == [None, None, 0.3]
        assert after["dev"] == [None, 2.0, 1.0]
        left = [bytes(k) for k in client.scan_iter(match=b"*" + suffix, count=1000)]
        assert len(left) == 4 and not [k for k in left if b"u1" in k]
    finally:
        for k in client.scan_iter(match=b"*" + project.encode(), count=1000):
            client.delete(k)
        client.close()


def test_restriction_and_objection_are_appended_not_rewritten(world: dict[str, Any]) -> None:
    ledger: ConsentLedger = world["ledger"]
    restrict("u2", ledger, collection_method="email")
    restrict("u2", ledger, lift=True, collection_method="email")
    object_to("u2", "personalised_recommendations", ledger, collection_method="web")
    controls = ledger.controls("u2")
    assert [(c["kind"], c["active"]) for c in controls] == [
        ("restriction", True),
        ("restriction", False),
        ("objection", True),
    ]
    state = ledger.state("u2")
    assert not state.restricted and state.objects_to("personalised_recommendations")
    from features.privacy.registry import RegistryError

    with pytest.raises(RegistryError):
        object_to("u2", "advertising", ledger, collection_method="web")


def test_retention_deletes_and_anonymises_per_category(world: dict[str, Any]) -> None:
    s = world["settings"]
    assert retention_days("user.device.ip_address", s) == 90
    assert retention_days("user.behavior.browsing_history", s) == 730
    assert retention_days("user.demographic.date_of_birth", s) is None
    dry = enforce_retention(now=NOW, engine=world["engine"], dry_run=True)
    assert dry.offline_rows_deleted["interactions"] == 1
    assert len(read_table(s.events_dir, "interactions")) == 4  # dry run changed nothing

    report = enforce_retention(now=NOW, engine=world["engine"])
    inter = read_table(s.events_dir, "interactions").set_index("event_id")
    assert list(inter.index) == ["e1", "e2", "e3"]  # e4 (800 days) past 730 days of browsing history
    assert inter["ip"].isna().tolist() == [False, True, False]  # e2 (200 days) past 90 days for IPs
    assert inter["device_id"].isna().tolist() == [False, True, False]
    assert inter["ip_country"].notna().all()  # 365 days for imprecise location
    pays = read_table(s.events_dir, "payments").set_index("payment_id")
    assert list(pays.index) == ["p1", "p2"]  # p3 past 10 years
    consent = read_table(s.events_dir, "consent_events")
    # r2 (3000 days) is old and superseded: deleted; r3/r4 are old but still the current state: kept
    assert sorted(consent["receipt_id"]) == ["r1", "r3", "r4"]
    assert report.ledger_rows_deleted["consent_ledger"] == 1
    assert [h["receipt_id"] for h in world["ledger"].history("u2")] == ["r3", "r4"]
    assert report.service_rows_deleted == {"decision_log": 0}
    later = enforce_retention(now=NOW + dt.timedelta(days=700), engine=world["engine"])
    assert later.service_rows_deleted == {"decision_log": 2, "decision_reviews": 2}


def test_cli_rights_round_trip(world: dict[str, Any], tmp_path: Path) -> None:
    from serving.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["privacy", "consent-set", "u2", "personalised_recommendations", "given"])
    assert out.exit_code == 0, out.output
    got = json.loads(runner.invoke(app, ["privacy", "consent-get", "u2"]).output)
    assert got["current"]["consents"]["personalised_recommendations"]["status"] == "given"
    decided = json.loads(
        runner.invoke(
            app, ["privacy", "decide", "u2", "personalised_recommendations", "--dob", "1985-05-05"]
        ).output
    )
    assert decided["tier"] == "personalized"
    assert (
        runner.invoke(app, ["privacy", "object", "u2", "--purpose", "personalised_recommendations"]).exit_code
        == 0
    )
    decided = json.loads(
        runner.invoke(
            app, ["privacy", "decide", "u2", "personalised_recommendations", "--dob", "1985-05-05"]
        ).output
    )
    assert decided["tier"] == "limited" and decided["reasons"][0]["code"] == "objection"
    bad = runner.invoke(app, ["privacy", "consent-set", "u2", "newsletter", "given"])
    assert bad.exit_code == 2 and "purpose must be one of" in bad.output and "Traceback" not in bad.output
    assert runner.invoke(app, ["privacy", "erase", "u2"]).exit_code == 2  # needs --yes
    target = tmp_path / "u2.json"
    assert runner.invoke(app, ["privacy", "export", "u2", "--out", str(target), "--no-online"]).exit_code == 0
    assert json.loads(target.read_text())["subject_id"] == "u2"
    erased = runner.invoke(app, ["privacy", "erase", "u2", "--yes"])
    assert erased.exit_code == 0, erased.output
    assert json.loads(erased.stdout)["tombstone_receipt"]
    retained = runner.invoke(
        app, ["privacy", "enforce-retention", "--now", "2025-06-01T00:00:00+00:00", "--dry-run"]
    )
    assert retained.exit_code == 0 and json.loads(retained.output)["dry_run"] is True
    assert ConsentPurpose.PERSONALISATION.value in runner.invoke(app, ["privacy", "purposes"]).output


def test_erasure_refuses_empty_subject(world: dict[str, Any]) -> None:
    from features.privacy.erasure import ErasureError

    with pytest.raises(ErasureError):
        erase_subject("", engine=world["engine"])
    with world["engine"].connect() as conn:
        assert conn.execute(select(text("count(*)")).select_from(text("consent_ledger"))).scalar_one() == 4


def test_unreachable_redis_is_a_clear_retryable_error(world: dict[str, Any]) -> None:
    from features.privacy.erasure import ErasureError

    s = world["settings"]
    s.feature_repo_dir.mkdir(parents=True)
    (s.feature_repo_dir / "feature_store.yaml").write_text(
        yaml.safe_dump(
            {"project": "x", "online_store": {"type": "redis", "connection_string": "127.0.0.1:1,db=0"}}
        )
    )
    with pytest.raises(ErasureError, match="unreachable"):
        erase_subject("u1", engine=world["engine"])
    assert world["ledger"].history("u1")  # nothing half-done in the ledger: retry later
    assert read_table(s.events_dir, "users")["user_id"].tolist() == ["u1", "u2"]
