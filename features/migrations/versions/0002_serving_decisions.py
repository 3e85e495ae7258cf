"""Decision log, review queue and API keys of the serving API.

Revision ID: 0002_serving_decisions
Revises: 0001_privacy_ledger
Create Date: 2025-02-12

The tables are described in `serving.decisions`. Decisions are never updated after they are
written (a human outcome is a new row that supersedes the automated one); rows leave only
through erasure and retention.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from features.privacy.sqltypes import UTCDateTime

revision: str = "0002_serving_decisions"
down_revision: str | Sequence[str] | None = "0001_privacy_ledger"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "decision_log",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("subject_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("reference_id", sa.String(128), nullable=True),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("degraded", sa.Boolean(), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=True),
        sa.Column("model_version", sa.String(32), nullable=True),
        sa.Column("model_hash", sa.String(64), nullable=True),
        sa.Column("feature_names", sa.JSON(), nullable=False),
        sa.Column("vectors", sa.JSON(), nullable=False),
        sa.Column("raw_scores", sa.JSON(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("thresholds", sa.JSON(), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("human_review_required", sa.Boolean(), nullable=False),
        sa.Column("consent_snapshot", sa.JSON(), nullable=False),
        sa.Column("output", sa.JSON(), nullable=False),
        sa.Column(
            "supersedes", sa.String(36), sa.ForeignKey("decision_log.id", ondelete="CASCADE"), nullable=True
        ),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("source IN ('automated', 'human')", name="ck_decision_log_source"),
    )
    op.create_index("ix_decision_log_subject_time", "decision_log", ["subject_id", "created_at"])
    op.create_index("ix_decision_log_created", "decision_log", ["created_at"])
    op.create_table(
        "decision_reviews",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "decision_id", sa.String(36), sa.ForeignKey("decision_log.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("subject_id", sa.String(128), nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("statement", sa.Text(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_at", UTCDateTime(), nullable=False),
        sa.Column("resolved_at", UTCDateTime(), nullable=True),
        sa.Column("reviewer", sa.String(128), nullable=True),
        sa.Column("resolution", sa.String(32), nullable=True),
        sa.Column("resolution_note", sa.Text(), nullable=True),
        sa.Column("resolution_decision_id", sa.String(36), nullable=True),
        sa.CheckConstraint("status IN ('open', 'resolved')", name="ck_decision_reviews_status"),
    )
    op.create_index("ix_decision_reviews_status_time", "decision_reviews", ["status", "requested_at"])
    op.create_index("ix_decision_reviews_subject", "decision_reviews", ["subject_id"])
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_index("ix_decision_reviews_subject", table_name="decision_reviews")
    op.drop_index("ix_decision_reviews_status_time", table_name="decision_reviews")
    op.drop_table("decision_reviews")
    op.drop_index("ix_decision_log_created", table_name="decision_log")
    op.drop_index("ix_decision_log_subject_time", table_name="decision_log")
    op.drop_table("decision_log")
