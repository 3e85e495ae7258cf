"""Request and response models of the API (separate classes: what comes in is never echoed blindly).

Validation is strict on purpose: numbers must be JSON numbers (no "12.5" strings, no booleans),
money is finite, non-negative and bounded, identifiers are short ASCII tokens, countries are
ISO-2, currencies come from a closed list, free text refuses control characters and unpaired
surrogates. Every failure is a 422 whose message names the field and the rule.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
)

from features.events import ConsentPurpose, InteractionType

MAX_AMOUNT = 100_000.0
MAX_ITEMS_PER_PAYMENT = 50
MAX_EVENTS_PER_CALL = 500
MAX_K = 100
MAX_STATEMENT = 2000

#: Currencies accepted, with the fixed rate to EUR (the models' unit). BGN is pegged to the euro.
CURRENCY_TO_EUR: dict[str, float] = {"EUR": 1.0, "BGN": 1 / 1.95583}


class Currency(StrEnum):
    EUR = "EUR"
    BGN = "BGN"


Id = Annotated[
    str,
    Strict(),
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"),
    Field(description="Identifier: 1-128 ASCII letters, digits, '_', '.', ':', '-'."),
]
Country = Annotated[
    str, Strict(), StringConstraints(pattern=r"^[A-Z]{2}$"), Field(description="ISO 3166-1 alpha-2.")
]
Amount = Annotated[
    float,
    Strict(),
    Field(ge=0.0, le=MAX_AMOUNT, allow_inf_nan=False, description=f"Finite, 0 to {MAX_AMOUNT:.0f}."),
]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def _clean_text(value: str) -> str:
    """NFC-normalised text without control characters, private-use or unassigned code points."""
    text = unicodedata.normalize("NFC", value)
    for ch in text:
        cat = unicodedata.category(ch)
        if (cat == "Cc" and ch not in "\n\t") or cat in ("Cs", "Co", "Cn"):
            raise ValueError(f"text contains a disallowed character U+{ord(ch):04X} ({cat})")
    if not text.strip():
        raise ValueError("text must not be blank")
    return text


def _not_future(value: dt.datetime) -> dt.datetime:
    now = dt.datetime.now(dt.UTC)
    if value > now + dt.timedelta(minutes=5):
        raise ValueError("time is in the future")
    if value.year < 2000:
        raise ValueError("time is before 2000")
    return value.astimezone(dt.UTC)


Text = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_STATEMENT), AfterValidator(_clean_text)]
EventTime = Annotated[AwareDatetime, AfterValidator(_not_future)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=4096)


# --- scoring ------------------------------------------------------------------------------------


class PaymentIn(StrictModel):
    """A payment at checkout, before it is authorised."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "payment_id": "p-000123",
                    "user_id": "u-0042",
                    "item_ids": ["i-0007", "i-0101"],
                    "amount": 24.5,
                    "currency": "EUR",
                    "card_fingerprint": "card-9f2c",
                    "card_bin_country": "BG",
                    "billing_country": "BG",
                    "device_id": "dev-77aa",
                    "ip": "203.0.113.7",
                    "ip_country": "BG",
                    "creator_id": "c-0005",
                }
            ]
        },
    )

    payment_id: Id
    user_id: Id
    item_ids: list[Id] = Field(min_length=1, max_length=MAX_ITEMS_PER_PAYMENT)
    amount: Amount
    currency: Currency = Field(description="EUR, or BGN (converted at the fixed peg 1.95583).")
    payment_time: EventTime | None = Field(None, description="Defaults to the time the request arrives.")
    card_fingerprint: Id | None = None
    card_bin_country: Country | None = None
    billing_country: Country | None = None
    device_id: Id | None = None
    ip: IPv4Address | IPv6Address | None = Field(None, description="Used for signals, never logged.")
    ip_country: Country | None = None
    creator_id: Id | None = Field(None, description="Seller paid by this payment.")


class ModelRef(BaseModel):
    name: str
    version: str


class ReasonCode(BaseModel):
    code: str = Field(description="Model input behind the reason.")
    description: str
    value: float | None = Field(description="The input's value for this payment (null = not available).")
    effect: Literal["raises_risk", "lowers_risk"]
    weight: float = Field(description="Contribution in log-odds (TreeSHAP).")


class ScoreOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "decision_id": "5b0d3c9e-4a43-4c55-9a0e-3f1f1f0c2b7a",
                    "payment_id": "p-000123",
                    "fraud_probability": 0.012,
                    "risk_score": 1,
                    "outcome": "approve",
                    "tier": "full",
                    "human_review": False,
                    "reasons": [],
                    "model": {"name": "fraud-full", "version": "3"},
                    "degraded": False,
                }
            ]
        }
    )

    decision_id: str
    payment_id: str
    fraud_probability: Probability | None = Field(
        description="Calibrated probability that the payment is fraud; null when policy sends it to a human unscored."
    )
    risk_score: int | None = Field(ge=0, le=99, description="floor(100 x probability), capped at 99.")
    outcome: Literal["approve", "review", "decline"]
    tier: str = Field(description="Feature tier used (full, no_device_location, request_only).")
    human_review: bool = Field(description="True when policy routes this person's decision to a human.")
    reasons: list[ReasonCode] = Field(
        max_length=4, description="Up to four principal reasons (review/decline)."
    )
    model: ModelRef
    degraded: bool = Field(description="True if the online store was unreachable (request-only tier).")


# --- events ---------------------------------------------------------------------------------------


class InteractionIn(StrictModel):
    event_id: Id
    user_id: Id
    item_id: Id
    event_type: InteractionType
    event_time: EventTime
    session_id: Id | None = None
    device_id: Id | None = None
    ip: IPv4Address | IPv6Address | None = None
    ip_country: Country | None = None
    quantity: Annotated[int, Strict(), Field(ge=1, le=1000)] = 1


class EventsIn(StrictModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {
                            "event_id": "e-1",
                            "user_id": "u-0042",
                            "item_id": "i-0007",
                            "event_type": "view",
                            "event_time": "2025-03-01T12:00:00Z",
                        }
                    ]
                }
            ]
        },
    )

    events: list[InteractionIn] = Field(min_length=1, max_length=MAX_EVENTS_PER_CALL)


class EventsOut(BaseModel):
    accepted: int
    degraded: bool = Field(description="True if the online store was unreachable: features not updated.")


# --- recommendations ------------------------------------------------------------------------------


class RecContext(StrictModel):
    item_id: Id | None = Field(None, description="Picture on screen, if any.")
    exclude_item_ids: list[Id] = Field(default_factory=list, max_length=200)


class RecommendationIn(StrictModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={"examples": [{"user_id": "u-0042", "k": 10, "context": {"item_id": "i-0007"}}]},
    )

    user_id: Id = Field(description="The buyer; unknown (new) users get the limited tier.")
    k: Annotated[int, Strict(), Field(ge=1, le=MAX_K)] = 10
    context: RecContext = Field(default_factory=lambda: RecContext(item_id=None))


class RecommendedItem(BaseModel):
    item_id: str
    rank: int
    score: float
    source: str
    reason: str


class RecommendationOut(BaseModel):
    decision_id: str
    user_id: str
    personalized: bool
    tier: str
    items: list[RecommendedItem]
    model: ModelRef
    degraded: bool = False


# --- explanation ----------------------------------------------------------------------------------


class ExplainedReason(BaseModel):
    feature: str
    statement: str = Field(description="Plain-language reason with the person's own value.")
    your_value: float | None
    effect: Literal["raised", "lowered"]
    contribution: float = Field(description="TreeSHAP contribution, log-odds.")
    categories: list[str]


class CategoryUse(BaseModel):
    category: str
    why: str


class ReproducibilityCheck(BaseModel):
    logged_raw_score: float
    rescored_raw_score: float
    identical: bool
    contributions_sum: float
    base_value: float
    contributions_sum_matches: bool = Field(description="|sum(contributions) - raw| < 1e-9")
    model_hash_matches: bool


class YourRights(BaseModel):
    human_review: str
    express_view_and_contest: str
    object: str
    withdraw_consent: str
    access_and_portability: str
    erasure: str
    complain: str


class Explanation(BaseModel):
    decision_id: str
    decided_at: dt.datetime
    kind: str
    outcome: str
    significance: str
    consequences: str
    solely_automated: bool
    art22_ground: str | None
    human_involvement: str
    purpose: str
    purpose_description: str
    legal_basis: str
    logic: str
    principal_reasons: list[ExplainedReason] = Field(max_length=4)
    data_used: list[CategoryUse]
    data_not_used: list[CategoryUse]
    what_would_change_it: list[str]
    tier: str
    degraded: bool
    model: ModelRef
    model_hash: str | None
    explanation_method: str
    reproducibility: ReproducibilityCheck | None
    superseded_by_human: dict[str, Any] | None
    reviews: list[dict[str, Any]]
    your_rights: YourRights


# --- reviews -------------------------------------------------------------------------------------


class ReviewIn(StrictModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={"examples": [{"statement": "I bought this myself from my usual laptop."}]},
    )

    statement: Text = Field(description="Your view and why you contest the decision.")


class ReviewOut(BaseModel):
    review_id: str
    decision_id: str
    status: Literal["open", "resolved"]
    origin: str
    requested_at: dt.datetime
    statement: str | None = None
    resolution: str | None = None
    reviewer: str | None = None
    resolved_at: dt.datetime | None = None


class ReviewList(BaseModel):
    reviews: list[ReviewOut]


class ResolveIn(StrictModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [{"reviewer": "staff-17", "outcome": "approve", "note": "Verified by phone."}]
        },
    )

    reviewer: Id
    outcome: Literal["approve", "decline", "uphold"]
    note: Text | None = None


# --- consent and rights --------------------------------------------------------------------------


class ConsentIn(StrictModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={"examples": [{"purpose": "personalised_recommendations", "status": "withdrawn"}]},
    )

    purpose: ConsentPurpose
    status: Literal["given", "renewed", "refused", "withdrawn"]


class ConsentItem(BaseModel):
    purpose: str
    status: str
    valid: bool
    since: dt.datetime | None
    covers: list[str] = Field(description="Data categories this consent covers.")


class ConsentOut(BaseModel):
    subject_id: str
    consents: list[ConsentItem]
    restricted: bool
    objections: list[str]


class RestrictionIn(StrictModel):
    active: Annotated[bool, Strict()] = Field(
        description="true to restrict processing (Art 18), false to lift."
    )


class ObjectionIn(StrictModel):
    purpose: Literal["*", "fraud_detection", "personalised_recommendations", "model_training"] = "*"
    active: Annotated[bool, Strict()] = True


class ErasureOut(BaseModel):
    subject_id: str
    erased_at: dt.datetime
    counts: dict[str, Any]
    kept: str


# --- operations ----------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    models: dict[str, str]
    missing_models: list[str]
    database: bool
    online_store: bool
    recommender: bool
    detail: str | None = None


class ReloadOut(BaseModel):
    changed: dict[str, str]
    models: dict[str, str]


class ErrorOut(BaseModel):
    detail: Any
