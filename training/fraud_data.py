"""Fraud training examples from event tables: labels only once known, time slices, tiers.

A payment is labelled fraud when a fraud or friendly-fraud dispute about it has been
*reported* by the as-of time; the most recent ``label_delay_days`` are left out because their
labels cannot be known yet. Slices are consecutive in time: train, early stopping,
calibration, held-out test (the window promotion compares champion and challenger on).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from features.definitions import FeatureDef
from features.events import DisputeReason
from features.payment_features import PAYMENT_FEATURES, payment_feature_frame
from features.privacy.registry import allowed_features, get_registry
from features.storage import read_table, table_path

FRAUD_PURPOSE = "fraud_detection"
#: The availability fallback: request-time features only, nothing read from a store, and
#: nothing device- or location-derived, so it is allowed for everyone the purpose covers.
DEGRADED_TIER = "request_only"
LABEL_REASONS = (DisputeReason.FRAUD.value, DisputeReason.FRIENDLY_FRAUD.value)
SLICE_SHARES = {"train": 0.6, "valid": 0.15, "calib": 0.1, "test": 0.15}


class TrainingDataError(ValueError):
    """The events cannot yield a usable training set (too short, no fraud labelled yet, ...)."""


def fraud_tiers() -> list[str]:
    """Consent tiers of the fraud purpose (richest first), then the degraded fallback."""
    return [t.name for t in get_registry().purpose(FRAUD_PURPOSE).tiers] + [DEGRADED_TIER]


def tier_features(tier: str) -> list[FeatureDef]:
    """The inputs of one fraud tier, derived from the privacy registry (never listed by hand)."""
    if tier == DEGRADED_TIER:
        poorest = [t.name for t in get_registry().purpose(FRAUD_PURPOSE).tiers][-1]
        return [
            f for f in allowed_features(FRAUD_PURPOSE, poorest, PAYMENT_FEATURES) if f.entity == "request"
        ]
    return allowed_features(FRAUD_PURPOSE, tier, PAYMENT_FEATURES)


@dataclass(frozen=True)
class Windows:
    """Time edges of each slice (half-open ``[start, end)``) and the as-of time of the labels."""

    as_of: pd.Timestamp
    label_cutoff: pd.Timestamp
    edges: dict[str, tuple[pd.Timestamp, pd.Timestamp]]

    def as_params(self) -> dict[str, str]:
        out = {"as_of": self.as_of.isoformat(), "label_cutoff": self.label_cutoff.isoformat()}
        for name, (a, b) in self.edges.items():
            out[f"{name}_window"] = f"{a.isoformat()} .. {b.isoformat()}"
        return out


def fingerprint(events_dir: Path) -> str:
    """SHA-256 over the payment and dispute files: identifies the exact data a run saw."""
    h = hashlib.sha256()
    for table in ("payments", "disputes", "consent_events"):
        path = table_path(events_dir, table)
        if path.exists():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def labelled_examples(events_dir: Path, frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """Feature frame plus ``label``, ``label_known_at``, ``fraud_pattern`` (evaluation only)."""
    feats = payment_feature_frame(events_dir) if frame is None else frame
    payments = read_table(events_dir, "payments", columns=["payment_id", "fraud_pattern"])
    disputes = read_table(events_dir, "disputes", columns=["payment_id", "reason", "reported_time"])
    disputes = disputes[disputes["reason"].isin(LABEL_REASONS)]
    first = disputes.groupby("payment_id", as_index=False)["reported_time"].min()
    out = feats.merge(payments, on="payment_id", how="left").merge(first, on="payment_id", how="left")
    out = out.rename(columns={"reported_time": "label_known_at"})
    out["fraud_pattern"] = out["fraud_pattern"].fillna("none")
    return out


def split(
    examples: pd.DataFrame, label_delay_days: int, train_days: int = 0, as_of: pd.Timestamp | None = None
) -> tuple[dict[str, pd.DataFrame], Windows]:
    """Label as known at ``as_of`` and cut consecutive time slices of the labelled period."""
    t = pd.to_datetime(examples["payment_time"], utc=True)
    as_of = as_of or t.max()
    cutoff = as_of - pd.Timedelta(days=label_delay_days)
    start = t.min() if not train_days else max(t.min(), cutoff - pd.Timedelta(days=train_days))
    usable = examples[(t >= start) & (t < cutoff)].copy()
    if usable.empty:
        raise TrainingDataError(
            f"no payments between {start} and the label cutoff {cutoff}: the data must span more "
            f"than the label delay of {label_delay_days} days"
        )
    known = pd.to_datetime(usable["label_known_at"], utc=True)
    usable["label"] = (known.notna() & (known <= as_of)).astype(np.int8)
    span = cutoff - start
    edges: dict[str, tuple[pd.Timestamp, pd.Timestamp]] = {}
    lo = start
    acc = 0.0
    for name, share in SLICE_SHARES.items():
        acc += share
        hi = cutoff if name == "test" else start + span * acc
        edges[name] = (lo, hi)
        lo = hi
    ut = pd.to_datetime(usable["payment_time"], utc=True)
    slices = {name: usable[(ut >= a) & (ut < b)] for name, (a, b) in edges.items()}
    for name, part in slices.items():
        if part["label"].sum() == 0:
            raise TrainingDataError(
                f"the {name} slice {edges[name][0]:%Y-%m-%d}..{edges[name][1]:%Y-%m-%d} has no known fraud; "
                "simulate more users or days, or shorten the label delay"
            )
    return slices, Windows(as_of=as_of, label_cutoff=cutoff, edges=edges)


def tier_consent_mask(examples: pd.DataFrame, tier: str, events_dir: Path) -> np.ndarray:
    """Examples a model of ``tier`` may learn from: point-in-time consent, no minors, and
    nobody who is restricted or objects to fraud scoring or model training today.

    The degraded tier needs exactly what the poorest consent tier needs.
    """
    from features.privacy.pit_consent import training_mask

    consent_tier = (
        [t.name for t in get_registry().purpose(FRAUD_PURPOSE).tiers][-1] if tier == DEGRADED_TIER else tier
    )
    consent_path = table_path(events_dir, "consent_events")
    consent = (
        read_table(events_dir, "consent_events")
        if consent_path.exists()
        else pd.DataFrame(columns=["user_id", "purpose", "status", "event_time"])
    )
    users = read_table(events_dir, "users", columns=["user_id", "date_of_birth"])
    births = pd.Series(users["date_of_birth"].to_numpy(), index=users["user_id"].to_numpy())
    return training_mask(
        examples,
        consent,
        FRAUD_PURPOSE,
        consent_tier,
        time_col="payment_time",
        birth_dates=births,
        excluded_subjects=excluded_from_training(FRAUD_PURPOSE),
    )


def excluded_from_training(purpose: str) -> set[str]:
    """People the consent ledger says must not be in a training set for ``purpose`` now."""
    from features.db import get_engine
    from features.migrations import migrate
    from features.privacy.ledger import ConsentLedger
    from features.privacy.pit_consent import training_exclusions

    engine = get_engine()
    migrate(engine)
    return training_exclusions(ConsentLedger(engine), purpose)
