"""Data inventory of the offline event tables: whose data, which categories, kept how long.

Erasure, access export and retention all read this one map, so a new table or column is
declared once. Categories are fideslang keys; their retention comes from the settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

SUBJECT_COLUMNS = ("user_id", "subject_id")
"""Column names that hold a person's id in any table (offline files or service tables)."""

LINKED_KEYS = ("device_id", "card_fingerprint", "ip")
"""Identifiers that, when used by one person only, are that person's data too (online store keys)."""


@dataclass(frozen=True)
class TableSpec:
    """How one event table relates to people.

    ``row_category`` decides how long a row is kept; ``columns`` name columns whose own
    category may have a shorter retention (the value is nulled, the row kept).
    ``on_erasure``: ``delete`` the person's rows, or ``unlink`` them (null the id column)
    where the row is someone else's record (a creator's shop outlives its owner's buyer account).
    """

    table: str
    time_column: str
    source: Literal["provided", "observed"]
    row_category: str
    subject_column: str | None = "user_id"
    linked_by: str | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    on_erasure: Literal["delete", "unlink"] = "delete"
    keep_latest_by: tuple[str, ...] = ()
    export_omit: Mapping[str, str] = field(default_factory=dict)


_DEVICE = {
    "ip": "user.device.ip_address",
    "device_id": "user.device.device_id",
    "ip_country": "user.location.imprecise",
}

INVENTORY: Mapping[str, TableSpec] = {
    s.table: s
    for s in (
        TableSpec(
            "users",
            "signup_time",
            "provided",
            "user.account",
            columns={
                "date_of_birth": "user.demographic.date_of_birth",
                "country": "user.contact.address.country",
            },
        ),
        TableSpec("creators", "joined_time", "provided", "user.account", on_erasure="unlink"),
        TableSpec(
            "interactions",
            "event_time",
            "observed",
            "user.behavior.browsing_history",
            columns={**_DEVICE, "session_id": "user.device.cookie_id"},
        ),
        TableSpec(
            "payments",
            "payment_time",
            "observed",
            "user.payment",
            columns={
                **_DEVICE,
                "card_fingerprint": "user.financial.credit_card",
                "card_bin_country": "user.financial.credit_card",
            },
            export_omit={
                "fraud_pattern": "simulator ground truth for evaluation; not held about real people"
            },
        ),
        TableSpec(
            "disputes",
            "reported_time",
            "observed",
            "user.payment",
            subject_column=None,
            linked_by="payment_id",
        ),
        TableSpec(
            "consent_events",
            "event_time",
            "provided",
            "user.privacy_preferences",
            keep_latest_by=("user_id", "purpose"),
        ),
    )
}
