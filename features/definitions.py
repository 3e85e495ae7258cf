"""Feature definitions: the one source of truth for every model input.

Each feature declares what it is computed from (its data categories, fideslang keys) and
where the data comes from (provided by the person, observed, or derived). The privacy
registry (`features.privacy`) decides from these declarations which purpose and consent
tier may use which feature; Feast views and model inputs are generated from the same list.

The concrete lists live next to the pipelines that compute them (payments, recommendations)
and are collected in `ALL_FEATURES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Source = Literal["provided", "observed", "derived"]
DType = Literal["float64", "int64", "string"]
Monotone = Literal[-1, 0, 1]


@dataclass(frozen=True)
class FeatureDef:
    """One model input.

    ``entity`` names the Feast entity it is keyed by (``request`` for on-demand features
    computed from the incoming request). ``categories`` are fideslang data-category keys.
    """

    name: str
    entity: str
    description: str
    categories: tuple[str, ...]
    source: Source
    dtype: DType = "float64"
    # How the fraud risk may move when this input grows (LightGBM monotone constraint): +1 for
    # inputs that grow with the payment's own amount (paying more never lowers the score) and
    # for activity counts on the same user, card, device or IP (a burst never lowers it).
    monotone: Monotone = 0
