"""Point-in-time consent for training sets.

A training example may use personal features for a consent-based purpose only if the
consent was valid at *that example's* time, not today. `consent_valid_at` answers this for
millions of examples at once with one ``merge_asof`` per consent purpose; `training_mask`
and `training_set` apply the registry's rules for one purpose and tier (the consents the
tier needs, minors, restriction and objection), so a model of a tier is trained only on
examples that tier could have been used for.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from features.definitions import FeatureDef
from features.events import VALID_CONSENT, ConsentPurpose
from features.privacy.registry import Registry, get_registry
from features.settings import get_settings

VALID_VALUES = frozenset(s.value for s in VALID_CONSENT)


def consent_valid_at(
    consent_events: pd.DataFrame,
    subjects: Sequence[str] | np.ndarray | pd.Series,
    times: Sequence[dt.datetime] | np.ndarray | pd.Series | pd.DatetimeIndex,
    purpose: ConsentPurpose | str,
) -> np.ndarray:
    """Whether each (subject, time) had valid consent for ``purpose`` at that time.

    ``consent_events`` has the ``consent_events`` layout (user_id, purpose, status,
    event_time). An event at exactly the example's time counts; events at the same instant
    are ordered as given (the ledger's insertion order). No record, or a missing time,
    means no consent.
    """
    key = ConsentPurpose(purpose).value
    subj = pd.Series(subjects).astype(str).to_numpy() if len(subjects) else np.array([], dtype=object)
    when = _utc_naive(times)
    n = len(subj)
    if len(when) != n:
        raise ValueError(f"{n} subjects but {len(when)} times")
    out = np.zeros(n, dtype=bool)
    events = consent_events.loc[
        consent_events["purpose"].astype(str) == key, ["user_id", "status", "event_time"]
    ]
    if events.empty or n == 0:
        return out
    # integer codes for the person: merge_asof groups on them far faster than on strings
    codes, _ = pd.factorize(np.concatenate([subj, events["user_id"].astype(str).to_numpy()]))
    subj_codes, event_codes = codes[:n], codes[n:]
    right = pd.DataFrame(
        {
            "user_id": event_codes,
            "event_time": _utc_naive(events["event_time"]),
            "valid": events["status"].astype(str).isin(VALID_VALUES).to_numpy(),
        }
    ).sort_values("event_time", kind="mergesort")
    known = ~np.isnat(when)
    left = pd.DataFrame({"user_id": subj_codes[known], "t": when[known], "pos": np.flatnonzero(known)})
    left = left.sort_values("t", kind="mergesort")
    merged = pd.merge_asof(
        left,
        right,
        left_on="t",
        right_on="event_time",
        by="user_id",
        direction="backward",
        allow_exact_matches=True,
    )
    out[merged["pos"].to_numpy()] = merged["valid"].eq(True).to_numpy()
    return out


def _utc_naive(values: Any) -> np.ndarray:
    """datetime64[ns] in UTC without time zone (NaT kept), without going through Python objects."""
    idx = pd.DatetimeIndex(pd.to_datetime(values, utc=True))
    return idx.tz_localize(None).to_numpy(dtype="datetime64[ns]")


def minor_at(
    subjects: Sequence[str] | np.ndarray | pd.Series,
    times: Sequence[dt.datetime] | np.ndarray | pd.Series | pd.DatetimeIndex,
    birth_dates: Mapping[str, dt.date | None] | pd.Series,
    adult_age: int | None = None,
) -> np.ndarray:
    """Whether each subject was younger than ``adult_age`` at the example's time (unknown: False)."""
    adult = get_settings().adult_age if adult_age is None else adult_age
    dob_by_subject = (
        birth_dates if isinstance(birth_dates, pd.Series) else pd.Series(dict(birth_dates), dtype=object)
    )
    dob = pd.to_datetime(pd.Series(np.asarray(subjects, dtype=object)).map(dob_by_subject), errors="coerce")
    when = pd.Series(_utc_naive(times))
    years = when.dt.year - dob.dt.year
    before_birthday = (when.dt.month < dob.dt.month) | (
        (when.dt.month == dob.dt.month) & (when.dt.day < dob.dt.day)
    )
    age = years - before_birthday.astype(int)
    return (age < adult).fillna(False).to_numpy(dtype=bool)


def training_exclusions(ledger: object, purpose: str, at: dt.datetime | None = None) -> set[str]:
    """Subjects restricted, or objecting to ``purpose`` or to model training, at ``at``."""
    from features.privacy.ledger import ConsentLedger

    if not isinstance(ledger, ConsentLedger):
        raise TypeError("ledger must be a ConsentLedger")
    return ledger.excluded_subjects(purpose, at) | ledger.excluded_subjects("model_training", at)


def training_mask(
    examples: pd.DataFrame,
    consent_events: pd.DataFrame,
    purpose: str,
    tier: str,
    *,
    subject_col: str = "user_id",
    time_col: str = "event_time",
    birth_dates: Mapping[str, dt.date | None] | pd.Series | None = None,
    excluded_subjects: Collection[str] = (),
    registry: Registry | None = None,
) -> np.ndarray:
    """Rows of ``examples`` a model of purpose/tier may learn from.

    Every consent the tier needs must have been valid at the row's time; people in
    ``excluded_subjects`` (restriction, objection) and minors at the row's time are left out
    (the ``model_training`` purpose excludes them).
    """
    reg = registry or get_registry()
    reg.purpose(purpose).tier(tier)  # clear error for unknown purpose/tier
    subjects, times = examples[subject_col].to_numpy(), examples[time_col]
    mask = np.ones(len(examples), dtype=bool)
    for consent in sorted(reg.tier_consents(purpose, tier)):
        mask &= consent_valid_at(consent_events, subjects, times, consent)
    if excluded_subjects:
        mask &= ~examples[subject_col].isin(list(excluded_subjects)).to_numpy()
    if birth_dates is not None:
        mask &= ~minor_at(subjects, times, birth_dates)
    return mask


@dataclass(frozen=True)
class TrainingSelection:
    frame: pd.DataFrame
    feature_names: list[str]
    dropped_features: list[str]
    rows_in: int
    rows_kept: int


def training_set(
    examples: pd.DataFrame,
    consent_events: pd.DataFrame,
    purpose: str,
    tier: str,
    features: Iterable[FeatureDef],
    **mask_options: object,
) -> TrainingSelection:
    """Rows allowed for purpose/tier, with the feature columns the tier may not use removed.

    Columns that are not declared features (keys, labels, times) are kept as they are.
    """
    reg_opt = mask_options.get("registry")
    reg = reg_opt if isinstance(reg_opt, Registry) else get_registry()
    defs = list(features)
    allowed = {f.name for f in reg.allowed_features(purpose, tier, defs)}
    declared = {f.name for f in defs}
    dropped = [c for c in examples.columns if c in declared and c not in allowed]
    mask = training_mask(examples, consent_events, purpose, tier, **mask_options)  # type: ignore[arg-type]
    frame = examples.loc[mask, [c for c in examples.columns if c not in dropped]]
    return TrainingSelection(
        frame=frame,
        feature_names=[c for c in frame.columns if c in allowed],
        dropped_features=dropped,
        rows_in=len(examples),
        rows_kept=int(mask.sum()),
    )
