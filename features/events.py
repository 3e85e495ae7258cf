"""The marketplace event model: one typed schema per entity, stored as parquet.

Every table is a pydantic model (used for API payloads and documentation) from which the
pyarrow schema of its parquet file is derived, so the two can never disagree.
Timestamps are UTC, microsecond precision.
"""

from __future__ import annotations

import datetime as dt
import types
import typing
from enum import StrEnum
from typing import Annotated, Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field


class KycStatus(StrEnum):
    NONE = "none"
    PENDING = "pending"
    VERIFIED = "verified"
    FAILED = "failed"


class ItemStatus(StrEnum):
    ACTIVE = "active"
    REMOVED = "removed"
    UNAVAILABLE = "unavailable"
    FLAGGED = "flagged"


class InteractionType(StrEnum):
    VIEW = "view"
    LIKE = "like"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"


class PaymentKind(StrEnum):
    PURCHASE = "purchase"
    CANCELLATION = "cancellation"


class FraudPattern(StrEnum):
    """Ground truth planted by the simulator. Evaluation only, never a feature."""

    NONE = "none"
    CARD_TESTING = "card_testing"
    STOLEN_CARD = "stolen_card"
    ACCOUNT_TAKEOVER = "account_takeover"
    RING = "ring"
    COLLUSION = "collusion"
    FRIENDLY_FRAUD = "friendly_fraud"
    # patterns of the imported fraud-handbook data set
    HANDBOOK_AMOUNT = "handbook_amount"
    HANDBOOK_TERMINAL = "handbook_terminal"
    HANDBOOK_CARD = "handbook_card"


class DisputeReason(StrEnum):
    FRAUD = "fraud"  # unauthorised use of the card
    FRIENDLY_FRAUD = "friendly_fraud"  # buyer claims not received / not authorised after using it
    NOT_AS_DESCRIBED = "not_as_described"


class ConsentPurpose(StrEnum):
    PERSONALISATION = "personalised_recommendations"
    DEVICE_LOCATION_SIGNALS = "fraud_device_location_signals"
    MARKETING = "marketing"


class ConsentStatus(StrEnum):
    """W3C DPV consent status. Only GIVEN and RENEWED are valid consent."""

    GIVEN = "given"
    RENEWED = "renewed"
    REQUESTED = "requested"
    REFUSED = "refused"
    WITHDRAWN = "withdrawn"
    EXPIRED = "expired"
    INVALIDATED = "invalidated"
    UNKNOWN = "unknown"


VALID_CONSENT = frozenset({ConsentStatus.GIVEN, ConsentStatus.RENEWED})

Timestamp = Annotated[dt.datetime, "timestamp"]
Country = Annotated[str, Field(min_length=2, max_length=2, pattern=r"^[A-Z]{2}$")]
Money = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class EventTable(BaseModel):
    """Base of every stored entity: knows its table name and time column."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    table: ClassVar[str]
    time_column: ClassVar[str | None] = None
    key: ClassVar[str]


class User(EventTable):
    table: ClassVar[str] = "users"
    time_column: ClassVar[str | None] = "signup_time"
    key: ClassVar[str] = "user_id"
    user_id: str
    signup_time: dt.datetime
    date_of_birth: dt.date | None = Field(None, description="As declared by the person; null for guests.")
    country: Country | None
    kyc_status: KycStatus
    is_guest: bool = False


class Creator(EventTable):
    table: ClassVar[str] = "creators"
    time_column: ClassVar[str | None] = "joined_time"
    key: ClassVar[str] = "creator_id"
    creator_id: str
    user_id: str | None = Field(None, description="The creator's own buyer account, if any.")
    joined_time: dt.datetime
    country: Country | None


class Item(EventTable):
    table: ClassVar[str] = "items"
    time_column: ClassVar[str | None] = "created_time"
    key: ClassVar[str] = "item_id"
    item_id: str
    creator_id: str
    style: str
    tags: list[str]
    price: Money
    currency: str = Field(min_length=3, max_length=3)
    created_time: dt.datetime
    status: ItemStatus


class Interaction(EventTable):
    table: ClassVar[str] = "interactions"
    time_column: ClassVar[str | None] = "event_time"
    key: ClassVar[str] = "event_id"
    event_id: str
    user_id: str
    item_id: str
    event_type: InteractionType
    event_time: dt.datetime
    session_id: str | None
    device_id: str | None
    ip: str | None
    ip_country: Country | None
    quantity: int = Field(1, ge=1)


class Payment(EventTable):
    table: ClassVar[str] = "payments"
    time_column: ClassVar[str | None] = "payment_time"
    key: ClassVar[str] = "payment_id"
    payment_id: str
    user_id: str
    item_ids: list[str]
    payment_time: dt.datetime
    kind: PaymentKind = PaymentKind.PURCHASE
    amount: Money
    currency: str = Field(min_length=3, max_length=3)
    card_fingerprint: str | None
    card_bin_country: Country | None
    billing_country: Country | None
    device_id: str | None
    ip: str | None
    ip_country: Country | None
    creator_id: str | None = Field(None, description="Seller (creator or merchant) paid by this payment.")
    fraud_pattern: FraudPattern | None = Field(
        None, description="Ground truth where known (simulator, handbook). Evaluation only, never a feature."
    )


class Dispute(EventTable):
    table: ClassVar[str] = "disputes"
    time_column: ClassVar[str | None] = "reported_time"
    key: ClassVar[str] = "dispute_id"
    dispute_id: str
    payment_id: str
    reason: DisputeReason
    reported_time: dt.datetime


class ConsentEvent(EventTable):
    table: ClassVar[str] = "consent_events"
    time_column: ClassVar[str | None] = "event_time"
    key: ClassVar[str] = "receipt_id"
    receipt_id: str
    user_id: str
    purpose: ConsentPurpose
    status: ConsentStatus
    event_time: dt.datetime
    source: str = Field(description="Collection method, e.g. signup_form, settings_page, banner.")
    policy_version: str
    jurisdiction: str = "EU"


TABLES: dict[str, type[EventTable]] = {
    m.table: m for m in (User, Creator, Item, Interaction, Payment, Dispute, ConsentEvent)
}


def _arrow_type(annotation: Any) -> tuple[pa.DataType, bool]:
    """Map a field annotation to (arrow type, nullable)."""
    nullable = False
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _arrow_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner, _ = _arrow_type(args[0])
        return inner, True
    if origin is list:
        inner, _ = _arrow_type(typing.get_args(annotation)[0])
        return pa.list_(inner), nullable
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        return pa.string(), nullable
    simple: dict[Any, pa.DataType] = {
        str: pa.string(),
        int: pa.int64(),
        float: pa.float64(),
        bool: pa.bool_(),
        dt.datetime: pa.timestamp("us", tz="UTC"),
        dt.date: pa.date32(),
    }
    return simple[annotation], nullable


def arrow_schema(model: type[EventTable]) -> pa.Schema:
    """The parquet schema of one table, derived from its pydantic model."""
    hints = typing.get_type_hints(model, include_extras=True)
    fields = []
    for name in model.model_fields:
        typ, nullable = _arrow_type(hints[name])
        fields.append(pa.field(name, typ, nullable=nullable))
    return pa.schema(fields)


def enum_columns(model: type[EventTable]) -> dict[str, set[str]]:
    """Columns whose values come from a closed vocabulary, with the allowed values."""
    hints = typing.get_type_hints(model)
    out: dict[str, set[str]] = {}
    for name in model.model_fields:
        ann = hints[name]
        args = typing.get_args(ann) or (ann,)
        for a in args:
            if isinstance(a, type) and issubclass(a, StrEnum):
                out[name] = {e.value for e in a}
    return out
