"""Consent ledger, processing controls and erasure tombstones (append-only).

Revision ID: 0001_privacy_ledger
Revises:
Create Date: 2025-02-12

UPDATE is refused by a trigger on every table (history is never rewritten); DELETE stays
possible for erasure and retention, which only `features.privacy.erasure` and
`features.privacy.retention` do.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from features.privacy.sqltypes import UTCDateTime

revision: str = "0001_privacy_ledger"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY = ("consent_ledger", "processing_controls", "erasure_tombstones")
STATUSES = ("given", "renewed", "requested", "refused", "withdrawn", "expired", "invalidated", "unknown")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "consent_ledger",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("receipt_id", sa.String(64), nullable=False, unique=True),
        sa.Column("subject_id", sa.String(128), nullable=False),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("event_time", UTCDateTime(), nullable=False),
        sa.Column("collection_method", sa.String(64), nullable=False),
        sa.Column("policy_version", sa.String(32), nullable=False),
        sa.Column("jurisdiction", sa.String(16), nullable=False),
        sa.Column("data_categories", sa.JSON(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in STATUSES)), name="ck_consent_ledger_status"
        ),
    )
    op.create_index(
        "ix_consent_ledger_subject_purpose_time", "consent_ledger", ["subject_id", "purpose", "event_time"]
    )
    op.create_table(
        "processing_controls",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("receipt_id", sa.String(64), nullable=False, unique=True),
        sa.Column("subject_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("scope", sa.String(64), nullable=False),
        sa.Column("event_time", UTCDateTime(), nullable=False),
        sa.Column("collection_method", sa.String(64), nullable=False),
        sa.Column("reason_code", sa.String(64), nullable=True),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("kind IN ('restriction', 'objection')", name="ck_processing_controls_kind"),
    )
    op.create_index(
        "ix_processing_controls_subject_time", "processing_controls", ["subject_id", "event_time"]
    )
    op.create_table(
        "erasure_tombstones",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("receipt_id", sa.String(64), nullable=False, unique=True),
        sa.Column("subject_id", sa.String(128), nullable=False),
        sa.Column("erased_at", UTCDateTime(), nullable=False),
        sa.Column("retain_until", UTCDateTime(), nullable=False),
        sa.Column("legal_basis", sa.Text(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
    )
    op.create_index("ix_erasure_tombstones_subject", "erasure_tombstones", ["subject_id"])
    _create_update_guards()


def _create_update_guards() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for table in APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
            )
    elif dialect == "postgresql":
        op.execute(
            "CREATE OR REPLACE FUNCTION aipic_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$"
        )
        for table in APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION aipic_refuse_update()"
            )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in APPEND_ONLY:
        if dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update ON {table}")
        elif dialect == "sqlite":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS aipic_refuse_update()")
    op.drop_table("erasure_tombstones")
    op.drop_table("processing_controls")
    op.drop_table("consent_ledger")
