"""A simulated AIpicMarket with planted fraud and consent behaviour, written as event tables.

Why: the fraud, recommendation and explanation models need data whose ground truth is known
(which payment is fraud and of which kind, who withdrew consent, who is secretly a minor), at
any size from a 30-user unit test to a million payments.

How it works
- The world is drawn up front as integer-indexed numpy arrays: buyers (country, declared and
  true age, taste over picture styles, favourite creators, price budget, activity, devices,
  cards, home IP), creators (some are also buyers: ``creators.user_id``), items (heavy-tailed
  popularity, prices, creation times over each creator's life so new items keep arriving, and a
  final status: a few are removed, unavailable or flagged part-way and vanish from then on).
- Activity is then generated one simulated day at a time, vectorised over all users: sessions
  (daily and weekly rhythm, mild growth) -> views (favourite creator, own taste or overall
  popularity, recent items boosted) -> likes -> add_to_cart (taste and price sensitivity) ->
  checkout, one payment per (session, seller). Every payment writes one ``purchase``
  interaction per item with the payment's user, time, session, device and IP.
- Fraud is planted per day as episodes, sized so that each pattern keeps a fixed share of that
  day's payments (about 1 % in total, see ``FRAUD_MIX``; systematic rounding carries fractions
  over to the next day): card testing, stolen cards, account takeover, rings sharing devices and
  cards, buyer-creator collusion (wash trading) and friendly fraud (a legitimate purchase that is
  later charged back). ``payments.fraud_pattern`` holds the truth ("none" for legitimate).
- Disputes: 85-100 % of fraud payments (depending on the pattern) and a few legitimate ones
  (``not_as_described``) are disputed 1-120 days after the payment, log-normally skewed (median
  about 3.5 weeks). Disputes reported after the simulated period are KEPT: they are the labels
  a model trained at the end of the period does not know yet, which label-delay tests need.
  Filter on ``reported_time`` to see what was known at a given date.
- Consent: per user and purpose (personalised recommendations, fraud device/location signals)
  a choice at signup (given / refused / nothing = unknown), re-consent after the 2025 policy
  change, later withdrawal or late consent, and re-consent ("renewed") after a withdrawal.
- Truth that is not part of the event model goes to ``truth/users_truth.parquet`` (true minor,
  true date of birth, role in planted fraud, ring id).

Ids: payments ``p…``, interactions ``e…``, sessions ``s…``, disputes ``d…`` and consent receipts
``r…`` are numbered in time order; items ``i…`` and creators ``c…`` in creation order; users
``u…``, devices ``dev…`` and card fingerprints ``fp…`` are scrambled numbers, so that their order
does not give away the accounts fraudsters created during the run (``users`` counts ordinary
buyers; those accounts come on top and are listed in the truth file).

Determinism: every draw comes from ``np.random.default_rng([seed, stream, day])``, no wall-clock
time enters the data, sorts are stable and parquet files are written in a fixed order, so the
same config gives the same bytes (with the same numpy/pyarrow versions). Memory: only one day of
interactions is held at a time (each day becomes one row group); payments are kept as compact
arrays until the end. Every table is validated against ``features.events``: the small ones go
through ``storage.write_table``, the big ones (interactions, payments, consent receipts) through
``storage.validate`` per row group and an atomic rename, skipping a costly pandas round trip.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.events import (
    TABLES,
    ConsentPurpose,
    ConsentStatus,
    DisputeReason,
    FraudPattern,
    InteractionType,
    ItemStatus,
    KycStatus,
    arrow_schema,
)
from features.storage import validate, write_table

US = 1_000_000  # microseconds per second: every time is int64 microseconds since the epoch
DAY = 86_400 * US
TRUTH_DIR = "truth"
USERS_TRUTH = "users_truth.parquet"


class SimulationError(ValueError):
    """The simulation config is invalid; the message says which field and why."""


# --- Vocabulary ---------------------------------------------------------------------------------
EEA = frozenset(
    {"AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IT", "LT", "LU",
     "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK", "IS", "LI", "NO"}
)  # fmt: skip
_USER_COUNTRIES = {
    "BG": 22, "DE": 12, "FR": 8, "IT": 7, "ES": 7, "PL": 5, "RO": 5, "NL": 4, "GR": 4, "AT": 2,
    "BE": 2, "PT": 2, "SE": 2, "CZ": 2, "HU": 2, "IE": 1, "DK": 1, "FI": 1, "SK": 1, "HR": 1,
    "LT": 1, "SI": 0.5, "LV": 0.5, "EE": 0.5, "CY": 0.5, "LU": 0.3, "MT": 0.3, "NO": 0.7,
    "GB": 4, "US": 3, "CH": 1, "TR": 1, "UA": 1, "RS": 1, "CA": 0.5,
}  # fmt: skip
_FRAUD_IP_COUNTRIES = {
    "NG": 10, "RU": 8, "BR": 8, "VN": 8, "ID": 6, "IN": 6, "PK": 4, "CN": 5, "US": 8, "UA": 5,
    "TR": 4, "RO": 3, "NL": 4, "DE": 3, "BG": 2, "MA": 3, "PH": 4,
}  # fmt: skip
_CARD_TEST_BINS = {"US": 30, "GB": 15, "DE": 10, "FR": 10, "IT": 8, "ES": 8, "BG": 5, "PL": 5, "CA": 5}
COUNTRIES: tuple[str, ...] = tuple(sorted(set(_USER_COUNTRIES) | set(_FRAUD_IP_COUNTRIES) | set(EEA)))
_CODE = {c: i for i, c in enumerate(COUNTRIES)}
_IS_EEA = np.array([c in EEA for c in COUNTRIES])
_LT = _CODE["LT"]


def _dist(weights: Mapping[str, float]) -> np.ndarray:
    p = np.zeros(len(COUNTRIES))
    for c, w in weights.items():
        p[_CODE[c]] = w
    return p / p.sum()


USER_COUNTRY_P = _dist(_USER_COUNTRIES)
EU_COUNTRY_P = _dist({c: w for c, w in _USER_COUNTRIES.items() if c in EEA})
FRAUD_IP_P = _dist(_FRAUD_IP_COUNTRIES)
CARD_TEST_BIN_P = _dist(_CARD_TEST_BINS)

STYLES = (
    "photorealistic", "anime", "fantasy", "sci_fi", "portrait", "landscape",
    "abstract", "pixel_art", "watercolor", "cyberpunk", "minimalist", "surreal",
)  # fmt: skip
_STYLE_W = np.array([16, 18, 12, 9, 8, 8, 6, 5, 5, 6, 3, 4], dtype=float)
STYLE_P = _STYLE_W / _STYLE_W.sum()
_YOUNG_STYLES = np.array([s in {"anime", "fantasy", "pixel_art", "cyberpunk"} for s in STYLES])
_STYLE_TAGS = {
    "photorealistic": ["portrait", "city", "nature", "product", "food", "street"],
    "anime": ["character", "chibi", "mecha", "school", "magic_girl", "shonen"],
    "fantasy": ["dragon", "castle", "elf", "wizard", "forest", "epic"],
    "sci_fi": ["space", "robot", "planet", "starship", "alien", "future"],
    "portrait": ["face", "studio", "vintage", "fashion", "black_white", "closeup"],
    "landscape": ["mountain", "sea", "sunset", "desert", "lake", "aurora"],
    "abstract": ["geometric", "fluid", "fractal", "colorful", "texture", "pattern"],
    "pixel_art": ["retro", "8bit", "game", "sprite", "isometric", "tileset"],
    "watercolor": ["flowers", "botanical", "soft", "pastel", "animals", "sketch"],
    "cyberpunk": ["neon", "city", "hacker", "rain", "android", "night"],
    "minimalist": ["line_art", "monochrome", "clean", "poster", "icon", "zen"],
    "surreal": ["dream", "melting", "impossible", "collage", "odd", "cosmic"],
}
_GENERAL_TAGS = ["4k", "wallpaper", "print", "sticker", "hdr", "square", "vertical"]
_TAG_VOCAB = [t for s in STYLES for t in _STYLE_TAGS[s]] + _GENERAL_TAGS
_TAGS_PER_STYLE = 6

# UTC hour and weekday (Monday first) rhythm of a mostly European audience
_HOUR_W = np.array(
    [1.0, 0.6, 0.4, 0.3, 0.3, 0.4, 0.8, 1.5, 2.2, 2.6, 2.8, 3.0,
     3.2, 3.1, 3.0, 3.1, 3.4, 4.0, 4.8, 5.4, 5.6, 5.0, 3.6, 2.0]
)  # fmt: skip
HOUR_P = _HOUR_W / _HOUR_W.sum()
WEEKDAY_FACTOR = np.array([0.92, 0.90, 0.93, 0.97, 1.05, 1.20, 1.18])

PATTERNS: tuple[FraudPattern, ...] = tuple(FraudPattern)
_P = {p: i for i, p in enumerate(PATTERNS)}
NONE_CODE = _P[FraudPattern.NONE]
# share of ALL payments (at fraud_rate=0.01) and mean payments per episode
FRAUD_MIX: dict[FraudPattern, tuple[float, float]] = {
    FraudPattern.CARD_TESTING: (0.0030, 8.0),
    FraudPattern.STOLEN_CARD: (0.0020, 1.8),
    FraudPattern.ACCOUNT_TAKEOVER: (0.0015, 1.8),
    FraudPattern.RING: (0.0012, 1.6),
    FraudPattern.COLLUSION: (0.0010, 2.0),
    FraudPattern.FRIENDLY_FRAUD: (0.0013, 1.0),
}
DISPUTE_PROB = {
    FraudPattern.CARD_TESTING: 0.85,
    FraudPattern.STOLEN_CARD: 0.95,
    FraudPattern.ACCOUNT_TAKEOVER: 0.92,
    FraudPattern.RING: 0.90,
    FraudPattern.COLLUSION: 0.85,
    FraudPattern.FRIENDLY_FRAUD: 1.0,  # a friendly fraud IS a chargeback of a purchase one made
}
NOT_AS_DESCRIBED_RATE = 0.0015
MAX_DISPUTE_DAYS = 120

_ETYPES = (InteractionType.VIEW, InteractionType.LIKE, InteractionType.ADD_TO_CART, InteractionType.PURCHASE)
VIEW, LIKE, CART, PURCHASE = range(4)
_KYC = (KycStatus.NONE, KycStatus.PENDING, KycStatus.VERIFIED, KycStatus.FAILED)
_STATUS = (ItemStatus.ACTIVE, ItemStatus.REMOVED, ItemStatus.UNAVAILABLE, ItemStatus.FLAGGED)
ROLES = ("none", "card_tester", "stolen_card", "ring", "colluder")
ROLE_CARD_TESTER, ROLE_STOLEN, ROLE_RING, ROLE_COLLUDER = 1, 2, 3, 4

POLICY_CHANGE = dt.datetime(2025, 2, 12, tzinfo=dt.UTC)
POLICY_OLD, POLICY_NEW = "2024-03-01", "2025-02-12"
_CONSENT_STATUSES = (
    ConsentStatus.UNKNOWN,
    ConsentStatus.GIVEN,
    ConsentStatus.REFUSED,
    ConsentStatus.WITHDRAWN,
    ConsentStatus.RENEWED,
)
C_UNKNOWN, C_GIVEN, C_REFUSED, C_WITHDRAWN, C_RENEWED = range(5)
_SOURCES = ("signup_form", "settings_page", "banner")
# purpose -> (P(given at signup), P(refused at signup)); the rest decide nothing (unknown)
CONSENT_AT_SIGNUP = {
    ConsentPurpose.PERSONALISATION: (0.62, 0.18),
    ConsentPurpose.DEVICE_LOCATION_SIGNALS: (0.76, 0.07),
}


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. ``users`` counts ordinary buyers; fraudsters' accounts come on top."""

    users: int = 2000
    days: int = 60
    seed: int = 7
    start: dt.datetime = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    fraud_rate: float = 0.01
    history_days: int = 730

    def __post_init__(self) -> None:
        if self.users < 10:
            raise SimulationError(f"users must be at least 10, got {self.users}")
        if not 1 <= self.days <= 3650:
            raise SimulationError(f"days must be between 1 and 3650, got {self.days}")
        if self.seed < 0:
            raise SimulationError(f"seed must be non-negative, got {self.seed}")
        if self.start.tzinfo is None:
            raise SimulationError("start must be timezone-aware (UTC)")
        if not 0 <= self.fraud_rate <= 0.2:
            raise SimulationError(f"fraud_rate must be between 0 and 0.2, got {self.fraud_rate}")
        if self.history_days < 30:
            raise SimulationError(f"history_days must be at least 30, got {self.history_days}")


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent stream per component and day, so days do not depend on each other."""
    return np.random.default_rng([seed, *stream])


def _to_us(t: dt.datetime) -> int:
    return round(t.timestamp()) * US


# --- ID strings ---------------------------------------------------------------------------------
def _seq_ids(prefix: str, idx: np.ndarray, width: int) -> pa.Array:
    """``prefix`` + zero-padded number: ids that sort like the number."""
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= 10**width):
        raise SimulationError(f"id number out of range for {width} digits (prefix {prefix!r})")
    # 10**width + i printed is "1000..i"; its leading "1" becomes the prefix
    return pc.utf8_replace_slice(pc.cast(pa.array(idx + 10**width), pa.string()), 0, 1, prefix)


def _opaque_ids(prefix: str, idx: np.ndarray, salt: int) -> pa.Array:
    """Ids scrambled by a bijection of 32-bit numbers, so their order leaks nothing (e.g. who
    was created by the fraud generator late in the run)."""
    x = (np.asarray(idx, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(salt)) & np.uint64(0xFFFFFFFF)
    return _seq_ids(prefix, x.astype(np.int64), 10)


def _take(values: pa.Array, idx: np.ndarray) -> pa.Array:
    """values[idx] with negative indices as null."""
    idx = np.asarray(idx, dtype=np.int64)
    return values.take(pa.array(idx, mask=idx < 0))


def _ts(us: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(us, dtype=np.int64), type=pa.timestamp("us", tz="UTC"))


def _const(value: str, n: int) -> pa.Array:
    return pa.array([value]).take(pa.array(np.zeros(n, dtype=np.int64)))


_COUNTRY_ARR = pa.array(COUNTRIES)
_PATTERN_ARR = pa.array([p.value for p in PATTERNS])
_ETYPE_ARR = pa.array([e.value for e in _ETYPES])


# --- Sampling -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _GroupSampler:
    """Weighted sampling of items within groups (style, creator), vectorised with one cumsum."""

    order: np.ndarray  # item indices sorted by group
    cum: np.ndarray  # cumulative weights in that order
    lo: np.ndarray  # first position of each group
    hi: np.ndarray  # one past the last position of each group

    @classmethod
    def build(
        cls, items: np.ndarray, groups: np.ndarray, weights: np.ndarray, n_groups: int
    ) -> _GroupSampler:
        o = np.argsort(groups, kind="stable")
        g = groups[o]
        keys = np.arange(n_groups)
        return cls(
            items[o],
            np.cumsum(weights[o]),
            np.searchsorted(g, keys, "left"),
            np.searchsorted(g, keys, "right"),
        )

    def has(self, group: np.ndarray) -> np.ndarray:
        return self.hi[group] > self.lo[group]

    def sample(self, group: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One item per entry of ``group`` (every group must be non-empty), u uniform in [0, 1)."""
        lo, hi = self.lo[group], self.hi[group]
        base = np.where(lo > 0, self.cum[np.maximum(lo - 1, 0)], 0.0)
        total = self.cum[hi - 1] - base
        pos = np.searchsorted(self.cum, base + u * total, "right")
        return self.order[np.clip(pos, lo, hi - 1)]


# --- The world ----------------------------------------------------------------------------------
@dataclass
class _Accounts:
    """Accounts created by fraudsters while simulating (appended after the ordinary buyers)."""

    first: int
    signup: list[int] = field(default_factory=list)
    country: list[int] = field(default_factory=list)
    dob: list[int] = field(default_factory=list)
    kyc: list[int] = field(default_factory=list)
    guest: list[bool] = field(default_factory=list)
    role: list[int] = field(default_factory=list)
    ring: list[int] = field(default_factory=list)

    def add(
        self,
        rng: np.random.Generator,
        start_day: int,
        signup: int,
        country: int,
        guest: bool,
        role: int,
        ring: int = -1,
    ) -> int:
        self.signup.append(int(signup))
        self.country.append(int(country))
        self.dob.append(-1 if guest else int(start_day - rng.uniform(19, 55) * 365.25))
        self.kyc.append(0 if guest else int(rng.choice(4, p=[0.8, 0.1, 0.02, 0.08])))
        self.guest.append(guest)
        self.role.append(role)
        self.ring.append(ring)
        return self.first + len(self.signup) - 1


@dataclass
class _Ring:
    members: np.ndarray
    devices: np.ndarray
    cards: np.ndarray
    ips: np.ndarray


@dataclass
class _Colluder:
    """One creator and the buyers who wash-trade its pictures: (user, device, card, ip) each."""

    creator: int
    buyers: list[tuple[int, int, int, int]]


@dataclass
class _World:
    cfg: SimulationConfig
    start: int
    end: int
    start_day: int  # days since the epoch of the start date
    # ordinary buyers (index 0..n-1)
    signup: np.ndarray
    country: np.ndarray
    dob: np.ndarray  # declared, days since epoch; -1 for guests
    true_dob: np.ndarray
    kyc: np.ndarray
    guest: np.ndarray
    activity: np.ndarray
    budget: np.ndarray
    taste: np.ndarray
    taste_cum: np.ndarray
    fav: np.ndarray  # (n, 3) creator index or -1
    devices: np.ndarray  # (n, 3) device index or -1
    n_dev: np.ndarray
    cards: np.ndarray  # (n, 2) card index or -1
    n_cards: np.ndarray
    home_ip: np.ndarray
    friendly_prone: np.ndarray
    # ips
    ip_country: np.ndarray
    mobile_base: np.ndarray
    mobile_size: np.ndarray
    travel_ips: np.ndarray
    fraud_ips: np.ndarray
    # creators and items
    creator_joined: np.ndarray
    creator_country: np.ndarray
    creator_user: np.ndarray
    item_creator: np.ndarray
    item_style: np.ndarray
    item_price: np.ndarray
    item_weight: np.ndarray
    item_created: np.ndarray
    item_status: np.ndarray
    item_end_day: np.ndarray
    item_tags_offsets: np.ndarray
    item_tags_flat: np.ndarray
    # grown while simulating
    n_devices: int
    card_country: list[int]
    accounts: _Accounts
    rings: list[_Ring] = field(default_factory=list)
    colluders: list[_Colluder] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.signup)

    def new_devices(self, k: int) -> np.ndarray:
        out = np.arange(self.n_devices, self.n_devices + k)
        self.n_devices += k
        return out

    def new_cards(self, countries: np.ndarray) -> np.ndarray:
        first = len(self.card_country)
        self.card_country.extend(int(c) for c in countries)
        return np.arange(first, len(self.card_country))

    def user_country(self, u: int) -> int:
        return int(self.country[u]) if u < self.n else self.accounts.country[u - self.n]


def _make_world(cfg: SimulationConfig) -> _World:
    """Draw buyers, creators, items, devices, cards, IPs, rings and colluders."""
    rng = _rng(cfg.seed, 1)
    start = _to_us(cfg.start)
    end = start + cfg.days * DAY
    start_day = start // DAY
    n = cfg.users
    S = len(STYLES)

    # buyers
    country = rng.choice(len(COUNTRIES), size=n, p=USER_COUNTRY_P)
    guest = rng.random(n) < 0.03
    existing = (rng.random(n) < 0.72) & ~guest
    back = (cfg.history_days * DAY * rng.beta(1.0, 1.8, n)).astype(np.int64)
    signup = np.where(existing, start - back - 3600 * US, start + rng.integers(0, cfg.days * DAY, n))
    adult_age = np.clip(18 + rng.gamma(2.0, 8.0, n), 18.05, 85) * 365.25
    r = rng.random(n)
    declared_minor = (r < 0.02) & ~guest
    hidden_minor = (r >= 0.02) & (r < 0.03) & ~guest
    minor = declared_minor | hidden_minor
    true_age = np.where(minor, rng.uniform(13, 17.95, n) * 365.25, adult_age)
    declared_age = np.where(
        hidden_minor, np.maximum(true_age + rng.uniform(2, 7, n) * 365.25, 18.2 * 365.25), true_age
    )
    true_dob = (start_day - true_age).astype(np.int64)
    dob = np.where(guest, -1, (start_day - declared_age).astype(np.int64))
    kyc = np.where(guest, 0, rng.choice(4, size=n, p=[0.70, 0.05, 0.22, 0.03]))
    activity = np.clip(rng.lognormal(np.log(0.22), 1.0, n), 0, 8) * np.where(minor, 1.2, 1.0)
    budget = rng.lognormal(np.log(9.0), 0.6, n) * np.where(minor, 0.5, 1.0)
    taste = 0.8 * rng.dirichlet(np.full(S, 0.35), n) + 0.2 * STYLE_P
    taste = np.where(minor[:, None], taste + 0.15 * _YOUNG_STYLES, taste)
    taste /= taste.sum(axis=1, keepdims=True)
    friendly_prone = rng.random(n) < 0.015

    # devices: 1-3 per buyer, a few shared within households
    n_dev = 1 + rng.binomial(2, 0.3, n)
    dev_first = np.concatenate([[0], np.cumsum(n_dev)[:-1]])
    k = np.arange(3)
    devices = np.where(k < n_dev[:, None], dev_first[:, None] + k, -1)
    share = (rng.random(n) < 0.015) & (n_dev >= 2)
    devices[share, 1] = devices[rng.integers(0, n, share.sum()), 0]
    n_devices = int(n_dev.sum())

    # cards: 1-2 per buyer, mostly issued at home, some by a Lithuanian neobank
    n_cards = 1 + (rng.random(n) < 0.3).astype(np.int64)
    card_first = np.concatenate([[0], np.cumsum(n_cards)[:-1]])
    cards = np.where(np.arange(2) < n_cards[:, None], card_first[:, None] + np.arange(2), -1)
    n_card_total = int(n_cards.sum())
    owner = np.repeat(np.arange(n), n_cards)
    rc = rng.random(n_card_total)
    card_country = np.where(
        rc < 0.88,
        country[owner],
        np.where(rc < 0.94, _LT, rng.choice(len(COUNTRIES), n_card_total, p=EU_COUNTRY_P)),
    )

    # IPs: one home IP per buyer (a few shared), carrier-grade NAT pools per country, travel and fraud pools
    home_ip = np.arange(n)
    j = rng.integers(0, n, n)
    shared_ip = (rng.random(n) < 0.04) & (country[j] == country)
    home_ip = np.where(shared_ip, j, home_ip)
    per_country = np.bincount(country, minlength=len(COUNTRIES))
    mobile_size = np.maximum(2, per_country // 40)
    mobile_base = n + np.concatenate([[0], np.cumsum(mobile_size)[:-1]])
    n_travel, n_fraud = max(200, n // 20), max(100, n // 50)
    travel_base = n + int(mobile_size.sum())
    ip_country = np.concatenate(
        [
            country,
            np.repeat(np.arange(len(COUNTRIES)), mobile_size),
            rng.choice(len(COUNTRIES), n_travel, p=USER_COUNTRY_P),
            rng.choice(len(COUNTRIES), n_fraud, p=FRAUD_IP_P),
        ]
    )
    travel_ips = travel_base + np.arange(n_travel)
    fraud_ips = travel_base + n_travel + np.arange(n_fraud)

    # creators
    C = max(5, round(n / 15))
    pop = rng.lognormal(0, 0.9, C)
    cstyle = rng.choice(S, size=C, p=STYLE_P)
    ccountry = rng.choice(len(COUNTRIES), size=C, p=USER_COUNTRY_P)
    newc = rng.random(C) < 0.12
    joined = np.where(
        newc,
        start + rng.integers(0, max(1, int(cfg.days * 0.8)) * DAY + 1, C),
        start - DAY - (cfg.history_days * DAY * rng.beta(1.2, 2.0, C)).astype(np.int64),
    )
    creator_user = np.full(C, -1)
    cands = np.flatnonzero(~guest & (signup < start - 2 * DAY))
    old = np.flatnonzero(~newc)
    n_link = min(len(cands), len(old), round(0.3 * C))
    if n_link:
        linked = rng.choice(old, size=n_link, replace=False)
        users = rng.choice(cands, size=n_link, replace=False)
        creator_user[linked] = users
        joined[linked] = np.minimum(signup[users] + rng.integers(3600 * US, 60 * DAY, n_link), end - DAY)
        joined[linked] = np.maximum(joined[linked], signup[users] + 3600 * US)
        ccountry[linked] = country[users]
        kyc[users] = np.where(rng.random(n_link) < 0.7, 2, kyc[users])

    # items: heavy-tailed count per creator, created over the creator's life up to the end
    per = 1 + np.floor(rng.pareto(1.6, C) * 6).clip(0, 400).astype(np.int64)
    icr = np.repeat(np.arange(C), per)
    N = len(icr)
    life = np.maximum(end - joined[icr] - 60 * US, US)
    created = joined[icr] + 60 * US + (rng.random(N) * life).astype(np.int64)
    istyle = np.where(rng.random(N) < 0.7, cstyle[icr], rng.choice(S, size=N, p=STYLE_P))
    level = rng.lognormal(np.log(5.5), 0.5, C)
    price = np.clip(np.floor(level[icr] * rng.lognormal(0, 0.55, N)) + 0.99, 0.99, 199.99)
    weight = rng.lognormal(0, 1.2, N) * pop[icr]
    rs = rng.random(N)
    status = np.select([rs < 0.035, rs < 0.05, rs < 0.057], [1, 2, 3], 0)
    removal = created + (rng.random(N) * np.maximum(end - created, 1)).astype(np.int64)
    end_day = np.where(status > 0, np.floor_divide(removal - start, DAY), cfg.days + 1)
    t1 = rng.integers(0, _TAGS_PER_STYLE, N)
    t2 = (t1 + 1 + rng.integers(0, _TAGS_PER_STYLE - 1, N)) % _TAGS_PER_STYLE
    general = np.where(rng.random(N) < 0.5, S * _TAGS_PER_STYLE + rng.integers(0, len(_GENERAL_TAGS), N), -1)
    tags = np.stack([istyle * _TAGS_PER_STYLE + t1, istyle * _TAGS_PER_STYLE + t2, general], axis=1).ravel()
    tags_flat = tags[tags >= 0]
    tags_offsets = np.concatenate([[0], np.cumsum(2 + (general >= 0))])

    # favourite creators: popular creators of the buyer's main style
    csampler = _GroupSampler.build(np.arange(C), cstyle, pop, S)
    top = np.argmax(taste, axis=1)
    top = np.where(csampler.has(top), top, int(np.argmax(np.bincount(cstyle, minlength=S))))
    n_fav = np.minimum(3, rng.poisson(1.0, n))
    fav = csampler.sample(np.repeat(top, 3), rng.random(3 * n)).reshape(n, 3)
    fav = np.where(np.arange(3) < n_fav[:, None], fav, -1)

    w = _World(
        cfg=cfg,
        start=start,
        end=end,
        start_day=start_day,
        signup=signup,
        country=country,
        dob=dob,
        true_dob=true_dob,
        kyc=kyc,
        guest=guest,
        activity=activity,
        budget=budget,
        taste=taste,
        taste_cum=np.cumsum(taste, axis=1),
        fav=fav,
        devices=devices,
        n_dev=n_dev,
        cards=cards,
        n_cards=n_cards,
        home_ip=home_ip,
        friendly_prone=friendly_prone,
        ip_country=ip_country,
        mobile_base=mobile_base,
        mobile_size=mobile_size,
        travel_ips=travel_ips,
        fraud_ips=fraud_ips,
        creator_joined=joined,
        creator_country=ccountry,
        creator_user=creator_user,
        item_creator=icr,
        item_style=istyle,
        item_price=price,
        item_weight=weight,
        item_created=created,
        item_status=status,
        item_end_day=end_day,
        item_tags_offsets=tags_offsets,
        item_tags_flat=tags_flat,
        n_devices=n_devices,
        card_country=[int(c) for c in card_country],
        accounts=_Accounts(first=n),
    )
    _make_rings(w, rng)
    _make_colluders(w, rng, per)
    return w


def _make_rings(w: _World, rng: np.random.Generator) -> None:
    """Fraud rings: several fresh accounts sharing a couple of devices, cards and IPs."""
    for r in range(max(1, round(w.n / 6000))):
        home = int(rng.choice(len(COUNTRIES), p=EU_COUNTRY_P))
        members = []
        for _ in range(int(rng.integers(3, 8))):
            c = home if rng.random() < 0.7 else int(rng.choice(len(COUNTRIES), p=EU_COUNTRY_P))
            signup = w.start - int(rng.integers(DAY, 60 * DAY))
            members.append(w.accounts.add(rng, w.start_day, signup, c, False, ROLE_RING, r))
        cards = w.new_cards(rng.choice(len(COUNTRIES), int(rng.integers(2, 5)), p=EU_COUNTRY_P))
        ips = np.concatenate([rng.choice(w.fraud_ips, 2), rng.choice(w.travel_ips, 1)])
        w.rings.append(_Ring(np.array(members), w.new_devices(int(rng.integers(1, 3))), cards, ips))


def _make_colluders(w: _World, rng: np.random.Generator, items_per_creator: np.ndarray) -> None:
    """Creators who wash-trade: a few accounts (sometimes their own) buy their pictures again and again."""
    C = len(w.creator_joined)
    cands = np.flatnonzero((items_per_creator >= 3) & (w.creator_joined < w.start - 30 * DAY))
    if not len(cands):
        cands = np.arange(C)
    n_coll = min(len(cands), max(1, round(C / 120)))
    for c in rng.choice(cands, size=n_coll, replace=False):
        cc = int(w.creator_country[c])
        ip = int(w.mobile_base[cc] + rng.integers(0, w.mobile_size[cc]))
        buyers = []
        for _ in range(int(rng.integers(2, 5))):
            signup = w.start - int(rng.integers(5 * DAY, 120 * DAY))
            u = w.accounts.add(rng, w.start_day, signup, cc, False, ROLE_COLLUDER)
            own_ip = ip if rng.random() < 0.6 else int(rng.choice(w.travel_ips))
            buyers.append((u, int(w.new_devices(1)[0]), int(w.new_cards(np.array([cc]))[0]), own_ip))
        own = int(w.creator_user[c])
        if own >= 0 and rng.random() < 0.6:
            buyers.append((own, int(w.devices[own, 0]), int(w.cards[own, 0]), int(w.home_ip[own])))
        w.colluders.append(_Colluder(int(c), buyers))


# --- One day ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Catalogue:
    """The items that can be seen on one day (created before it, not yet removed)."""

    by_style: _GroupSampler
    by_creator: _GroupSampler
    overall: _GroupSampler
    cheap: np.ndarray
    expensive: np.ndarray


def _catalogue(w: _World, d: int, day0: int) -> _Catalogue | None:
    idx = np.flatnonzero((w.item_created < day0) & (w.item_end_day > d))
    if not len(idx):
        return None
    age = (day0 - w.item_created[idx]) / DAY
    weight = w.item_weight[idx] * (1 + 3 * np.exp(-age / 10))
    price = w.item_price[idx]
    cheap = idx[price <= 2.99]
    if not len(cheap):
        cheap = idx[np.argsort(price, kind="stable")[: max(1, len(idx) // 20)]]
    return _Catalogue(
        by_style=_GroupSampler.build(idx, w.item_style[idx], weight, len(STYLES)),
        by_creator=_GroupSampler.build(idx, w.item_creator[idx], weight, len(w.creator_joined)),
        overall=_GroupSampler.build(idx, np.zeros(len(idx), dtype=np.int64), weight, 1),
        cheap=cheap,
        expensive=idx[price >= np.quantile(price, 0.85)],
    )


@dataclass
class _DayRows:
    """Payments and interactions of one day as lists of numpy chunks, concatenated at the end."""

    pay: dict[str, list[np.ndarray]] = field(default_factory=dict)
    inter: dict[str, list[np.ndarray]] = field(default_factory=dict)
    n_sessions: int = 0

    def new_session(self) -> int:
        self.n_sessions += 1
        return self.n_sessions - 1

    def add_payments(self, **cols: Any) -> None:
        n = len(cols["n_items"])
        for k, v in cols.items():
            arr = np.asarray(v)
            self.pay.setdefault(k, []).append(np.broadcast_to(arr, (n,)) if k != "items" else arr)

    def add_interactions(self, **cols: Any) -> None:
        n = len(cols["item"])
        for k, v in cols.items():
            self.inter.setdefault(k, []).append(np.broadcast_to(np.asarray(v), (n,)))

    def payments(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.pay.items()}

    def interactions(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.inter.items()}


def _within(groups_sizes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Cumulative sum of ``values`` restarting at every group (groups are consecutive runs)."""
    cs = np.cumsum(values)
    if cs.size == 0:  # every group empty (a tiny marketplace's quiet day)
        return cs
    first = np.concatenate([[0], np.cumsum(groups_sizes)[:-1]])
    return cs - np.repeat(cs[first] - values[first], groups_sizes)


def _legit_day(
    w: _World, cat: _Catalogue, d: int, day0: int, rng: np.random.Generator, rows: _DayRows
) -> int:
    """Ordinary browsing and buying of one day; returns the number of payments."""
    n = w.n
    weekday = (w.start_day + d + 3) % 7  # 1970-01-01 was a Thursday
    rate = w.activity * WEEKDAY_FACTOR[weekday] * (1 + 0.002 * d)
    signup_day = np.floor_divide(w.signup - w.start, DAY)
    rate = np.where(w.guest, np.where(signup_day == d, 1.5, 0.0), rate)
    rate = np.where(w.signup < day0 + DAY, rate, 0.0)
    user = np.repeat(np.arange(n), rng.poisson(rate))

    # session length and timing: evening peak, fits in the day, starts after signup
    nv = np.minimum(rng.geometric(0.25, len(user)), 30)
    gaps = 3 * US + rng.exponential(40 * US, nv.sum()).astype(np.int64)
    offs = _within(nv, gaps)
    last = np.cumsum(nv) - 1
    dur = offs[last] + 240 * US + 15 * US * nv
    hour = rng.choice(24, size=len(user), p=HOUR_P)
    begin = day0 + hour * 3600 * US + rng.integers(0, 3600 * US, len(user))
    begin = np.minimum(begin, day0 + DAY - dur - US)
    earliest = w.signup[user] + 60 * US
    begin = np.where(begin < earliest, earliest + rng.integers(0, 600 * US, len(user)), begin)
    ok = (begin + dur < day0 + DAY) & (begin >= day0)
    view_ok = np.repeat(ok, nv)
    user, nv, begin, offs = user[ok], nv[ok], begin[ok], offs[view_ok]
    n_s = len(user)
    if not n_s:
        return 0
    sess = np.repeat(np.arange(n_s), nv)
    rows.n_sessions = n_s
    vu = user[sess]
    vtime = begin[sess] + offs
    sess_end = vtime[np.cumsum(nv) - 1]

    # device and network of each session
    k = np.where(rng.random(n_s) < 0.7, 0, rng.integers(0, w.n_dev[user]))
    device = w.devices[user, k]
    r = rng.random(n_s)
    c = w.country[user]
    mobile = w.mobile_base[c] + rng.integers(0, w.mobile_size[c])
    ip = np.where(r < 0.015, rng.choice(w.travel_ips, n_s), np.where(r < 0.3, mobile, w.home_ip[user]))

    # which item each view shows: favourite creator, own taste, or overall popularity
    V = len(sess)
    src = rng.random(V)
    fav = w.fav[vu, rng.integers(0, 3, V)]
    item = np.full(V, -1)
    use_fav = (src < 0.22) & (fav >= 0)
    use_fav[use_fav] = cat.by_creator.has(fav[use_fav])
    item[use_fav] = cat.by_creator.sample(fav[use_fav], rng.random(int(use_fav.sum())))
    style = (rng.random(V)[:, None] > w.taste_cum[vu]).sum(axis=1).clip(0, len(STYLES) - 1)
    use_style = (item < 0) & (src < 0.85) & cat.by_style.has(style)
    item[use_style] = cat.by_style.sample(style[use_style], rng.random(int(use_style.sum())))
    rest = item < 0
    item[rest] = cat.overall.sample(np.zeros(int(rest.sum()), dtype=np.int64), rng.random(int(rest.sum())))
    # "more from this creator": later views of a session often stay with the first view's creator
    first_view = np.repeat(np.cumsum(nv) - nv, nv)
    more = (np.arange(V) != first_view) & (rng.random(V) < 0.3)
    focus = w.item_creator[item[first_view[more]]]
    item[more] = cat.by_creator.sample(focus, rng.random(int(more.sum())))

    # funnel: like and cart by taste and price sensitivity, checkout per session
    affinity = w.taste[vu, w.item_style[item]] * len(STYLES)
    is_fav = (w.fav[vu] == w.item_creator[item][:, None]).any(axis=1)
    liked = rng.random(V) < np.clip(0.10 * affinity**0.6 * (1 + is_fav), 0, 0.6)
    price = w.item_price[item]
    afford = 1 / (1 + (price / w.budget[vu]) ** 2)
    p_cart = 0.08 * affinity**0.5 * afford * (1 + 1.5 * liked) * (1 + 0.5 * is_fav)
    carted = rng.random(V) < np.clip(p_cart, 0, 0.8)
    key = sess.astype(np.int64) * len(w.item_creator) + item
    first = np.zeros(V, dtype=bool)
    first[np.unique(key, return_index=True)[1]] = True
    carted &= first  # one cart row per item and session
    bought = carted & (rng.random(n_s) < 0.75)[sess]

    like_t = vtime + rng.integers(2 * US, 15 * US, V)
    cart_t = vtime + rng.integers(3 * US, 25 * US, V)
    rows.add_interactions(
        user=vu, item=item, etype=VIEW, time=vtime, session=sess, device=device[sess], ip=ip[sess]
    )
    for mask, etype, t in ((liked, LIKE, like_t), (carted, CART, cart_t)):
        s = sess[mask]
        rows.add_interactions(
            user=vu[mask], item=item[mask], etype=etype, time=t[mask], session=s, device=device[s], ip=ip[s]
        )

    # payments: one per (session, seller), a few seconds apart after the last view
    b = np.flatnonzero(bought)
    if not len(b):
        return 0
    bs, bc = sess[b], w.item_creator[item[b]]
    o = np.lexsort((b, bc, bs))
    b, bs, bc = b[o], bs[o], bc[o]
    new = np.concatenate([[True], (bs[1:] != bs[:-1]) | (bc[1:] != bc[:-1])])
    pay_of = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    P = len(starts)
    ps = bs[starts]
    first_in_sess = np.concatenate([[True], ps[1:] != ps[:-1]])
    rank = np.arange(P) - np.maximum.accumulate(np.where(first_in_sess, np.arange(P), 0))
    ptime = sess_end[ps] + rng.integers(30 * US, 180 * US, P) + rank * rng.integers(3 * US, 12 * US, P)
    pu = user[ps]
    card = np.where((rng.random(P) < 0.85) | (w.n_cards[pu] < 2), w.cards[pu, 0], w.cards[pu, 1])
    card_c = np.asarray(w.card_country)[card]
    flat = item[b]
    rows.add_payments(
        user=pu,
        time=ptime,
        device=device[ps],
        ip=ip[ps],
        card=card,
        billing=np.where(w.guest[pu], card_c, w.country[pu]),
        creator=bc[starts],
        pattern=NONE_CODE,
        session=ps,
        n_items=np.bincount(pay_of, minlength=P),
        items=flat,
        amount=np.round(np.bincount(pay_of, weights=w.item_price[flat], minlength=P), 2),
    )
    return P


def _pay(
    w: _World,
    rows: _DayRows,
    user: int,
    times: np.ndarray,
    device: int,
    ip: int,
    card: np.ndarray | int,
    billing: np.ndarray | int,
    baskets: list[np.ndarray],
    pattern: FraudPattern,
    session: int,
) -> None:
    flat = np.concatenate(baskets)
    n_items = np.array([len(b) for b in baskets])
    pay_of = np.repeat(np.arange(len(baskets)), n_items)
    rows.add_payments(
        user=user,
        time=times,
        device=device,
        ip=ip,
        card=card,
        billing=billing,
        creator=w.item_creator[[b[0] for b in baskets]],
        pattern=_P[pattern],
        session=session,
        n_items=n_items,
        items=flat,
        amount=np.round(np.bincount(pay_of, weights=w.item_price[flat], minlength=len(baskets)), 2),
    )


def _views(
    rows: _DayRows,
    user: int,
    items: np.ndarray,
    t0: int,
    rng: np.random.Generator,
    session: int,
    device: int,
    ip: int,
    etype: int = VIEW,
) -> int:
    """A run of interactions 10-60 s apart from t0; returns the time of the last one."""
    times = t0 + np.cumsum(rng.integers(10 * US, 60 * US, len(items)))
    rows.add_interactions(
        user=user, item=items, etype=etype, time=times, session=session, device=device, ip=ip
    )
    return int(times[-1]) if len(times) else t0


def _basket(cat: _Catalogue, rng: np.random.Generator, anchor: int, w: _World, size: int) -> np.ndarray:
    """``anchor`` plus up to size-1 other visible items of the same seller."""
    c = w.item_creator[anchor]
    lo, hi = cat.by_creator.lo[c], cat.by_creator.hi[c]
    others = cat.by_creator.order[lo:hi]
    extra = rng.choice(others, size=min(size - 1, len(others)), replace=False) if size > 1 else others[:0]
    return np.unique(np.concatenate([[anchor], extra]))


def _foreign_ip(w: _World, rng: np.random.Generator, not_country: int) -> int:
    for _ in range(20):
        ip = int(rng.choice(w.fraud_ips))
        if w.ip_country[ip] != not_country:
            return ip
    return ip


def _episode_time(day0: int, rng: np.random.Generator, span_h: int = 4) -> int:
    return day0 + int(rng.integers(0, DAY - span_h * 3600 * US))


def _card_testing(w: _World, cat: _Catalogue, day0: int, rng: np.random.Generator, rows: _DayRows) -> None:
    """A bot on a guest account tries stolen card numbers with tiny purchases, minutes apart."""
    t0 = _episode_time(day0, rng)
    n = int(min(25, 4 + rng.poisson(4)))
    ip = int(rng.choice(w.fraud_ips))
    ipc = int(w.ip_country[ip])
    user = w.accounts.add(rng, w.start_day, t0 - int(rng.integers(60, 900)) * US, ipc, True, ROLE_CARD_TESTER)
    k = 1 if rng.random() < 0.35 else int(rng.integers(2, n + 1))
    cards = w.new_cards(rng.choice(len(COUNTRIES), size=k, p=CARD_TEST_BIN_P))
    card = cards[np.arange(n) % k]
    billing = np.where(rng.random(n) < 0.5, [w.card_country[c] for c in card], ipc)
    times = t0 + np.cumsum(rng.integers(40 * US, 300 * US, n))
    items = rng.choice(cat.cheap, size=n)
    _pay(
        w,
        rows,
        user,
        times,
        int(w.new_devices(1)[0]),
        ip,
        card,
        billing,
        [np.array([i]) for i in items],
        FraudPattern.CARD_TESTING,
        rows.new_session(),
    )


def _stolen_card(w: _World, cat: _Catalogue, day0: int, rng: np.random.Generator, rows: _DayRows) -> None:
    """A fresh or guest account, a new device, a card from one country and an IP from another."""
    t0 = _episode_time(day0, rng)
    bin_c = int(rng.choice(len(COUNTRIES), p=EU_COUNTRY_P))
    card = int(w.new_cards(np.array([bin_c]))[0])
    ip = _foreign_ip(w, rng, bin_c)
    ipc = int(w.ip_country[ip])
    guest = bool(rng.random() < 0.4)
    signup = t0 - int(rng.integers(60, 600) if guest else rng.integers(300, 3 * 86_400)) * US
    user = w.accounts.add(rng, w.start_day, signup, bin_c if rng.random() < 0.6 else ipc, guest, ROLE_STOLEN)
    device, session = int(w.new_devices(1)[0]), rows.new_session()
    n_pay = int(min(4, 1 + rng.poisson(0.8)))
    anchors = rng.choice(cat.expensive, size=n_pay)
    baskets = [_basket(cat, rng, int(a), w, 1 + int(rng.binomial(3, 0.4))) for a in anchors]
    seen = np.concatenate([anchors, rng.choice(cat.expensive, size=int(rng.integers(0, 4)))])
    last = _views(rows, user, rng.permutation(seen), t0, rng, session, device, ip)
    times = last + 60 * US + np.cumsum(rng.integers(60 * US, 400 * US, n_pay))
    billing = bin_c if rng.random() < 0.7 else ipc
    _pay(w, rows, user, times, device, ip, card, billing, baskets, FraudPattern.STOLEN_CARD, session)


def _account_takeover(
    w: _World, cat: _Catalogue, day0: int, rng: np.random.Generator, rows: _DayRows, victims: np.ndarray
) -> None:
    """Someone else logs in from a new device abroad and buys what the owner never liked."""
    if not len(victims):
        return
    victim = int(rng.choice(victims))
    uc = int(w.country[victim])
    ip = _foreign_ip(w, rng, uc)
    device, session = int(w.new_devices(1)[0]), rows.new_session()
    style = int(rng.choice(np.argsort(w.taste[victim], kind="stable")[:3]))
    sampler = cat.by_style if cat.by_style.has(np.array([style]))[0] else cat.overall
    grp = np.full(30, style if sampler is cat.by_style else 0)
    pool = sampler.sample(grp, rng.random(30))
    pool = pool[np.argsort(-w.item_price[pool], kind="stable")]
    n_pay = int(min(4, 1 + rng.poisson(0.8)))
    baskets = [_basket(cat, rng, int(a), w, 1 + int(rng.binomial(2, 0.4))) for a in pool[:n_pay]]
    t0 = _episode_time(day0, rng)
    last = _views(rows, victim, pool[: int(rng.integers(3, 9))], t0, rng, session, device, ip)
    times = last + 60 * US + np.cumsum(rng.integers(30 * US, 300 * US, n_pay))
    _pay(
        w,
        rows,
        victim,
        times,
        device,
        ip,
        int(w.cards[victim, 0]),
        uc,
        baskets,
        FraudPattern.ACCOUNT_TAKEOVER,
        session,
    )


def _ring(w: _World, cat: _Catalogue, day0: int, rng: np.random.Generator, rows: _DayRows) -> None:
    """One member of a ring buys with one of the ring's shared devices, cards and IPs."""
    ring = w.rings[int(rng.integers(0, len(w.rings)))]
    user = int(rng.choice(ring.members))
    device, card, ip = int(rng.choice(ring.devices)), int(rng.choice(ring.cards)), int(rng.choice(ring.ips))
    session = rows.new_session()
    pool = cat.overall.sample(np.zeros(12, dtype=np.int64), rng.random(12))
    pool = pool[np.argsort(-w.item_price[pool], kind="stable")]
    n_pay = int(min(3, 1 + rng.poisson(0.6)))
    baskets = [_basket(cat, rng, int(a), w, 1 + int(rng.binomial(1, 0.4))) for a in pool[:n_pay]]
    t0 = _episode_time(day0, rng)
    last = _views(rows, user, pool[: int(rng.integers(1, 4))], t0, rng, session, device, ip)
    times = last + 30 * US + np.cumsum(rng.integers(30 * US, 200 * US, n_pay))
    _pay(w, rows, user, times, device, ip, card, w.user_country(user), baskets, FraudPattern.RING, session)


def _collusion(w: _World, cat: _Catalogue, day0: int, rng: np.random.Generator, rows: _DayRows) -> None:
    """A colluding buyer views, likes and buys the same few pictures of one creator again."""
    visible = [c for c in w.colluders if cat.by_creator.has(np.array([c.creator]))[0]]
    if not visible:
        return
    col = visible[int(rng.integers(0, len(visible)))]
    lo, hi = cat.by_creator.lo[col.creator], cat.by_creator.hi[col.creator]
    own = cat.by_creator.order[lo:hi]
    boosted = np.sort(own)[:3]
    user, device, card, ip = col.buyers[int(rng.integers(0, len(col.buyers)))]
    session = rows.new_session()
    n_pay = int(min(4, 1 + rng.poisson(1.0)))
    picks = np.where(rng.random(n_pay) < 0.7, rng.choice(boosted, n_pay), rng.choice(own, n_pay))
    t0 = _episode_time(day0, rng)
    last = _views(rows, user, picks, t0, rng, session, device, ip)
    last = _views(rows, user, picks, last, rng, session, device, ip, etype=LIKE)
    times = last + 30 * US + np.cumsum(rng.integers(20 * US, 120 * US, n_pay))
    _pay(
        w,
        rows,
        user,
        times,
        device,
        ip,
        card,
        w.user_country(user),
        [np.array([p]) for p in picks],
        FraudPattern.COLLUSION,
        session,
    )


@dataclass
class _Quota:
    """Systematic rounding of expected episode counts, carried from day to day."""

    offset: np.ndarray
    total: np.ndarray

    def take(self, expected: np.ndarray) -> np.ndarray:
        before = np.floor(self.total + self.offset)
        self.total = self.total + expected
        return (np.floor(self.total + self.offset) - before).astype(np.int64)


def _fraud_day(
    w: _World, cat: _Catalogue, day0: int, rng: np.random.Generator, rows: _DayRows, legit: int, quota: _Quota
) -> None:
    """Plant the day's fraud episodes in proportion to its legitimate payments."""
    mix = list(FRAUD_MIX.items())
    base_total = sum(s for s, _ in FRAUD_MIX.values())
    scale = w.cfg.fraud_rate / base_total
    fraud_share = w.cfg.fraud_rate
    expected = np.array([legit * share * scale / (1 - fraud_share) / size for _, (share, size) in mix])
    counts = dict(zip([p for p, _ in mix], quota.take(expected), strict=True))

    # friendly fraud: legitimate purchases (by prone buyers, larger amounts) later charged back
    if legit and counts[FraudPattern.FRIENDLY_FRAUD]:
        amount = rows.pay["amount"][0]
        prone = w.friendly_prone[rows.pay["user"][0]]
        p = (1 + 30 * prone) * np.sqrt(amount)
        k = min(int(counts[FraudPattern.FRIENDLY_FRAUD]), legit)
        chosen = rng.choice(legit, size=k, replace=False, p=p / p.sum())
        pattern = np.array(rows.pay["pattern"][0], copy=True)
        pattern[chosen] = _P[FraudPattern.FRIENDLY_FRAUD]
        rows.pay["pattern"][0] = pattern

    victims = np.flatnonzero(
        ~w.guest & (w.signup < day0 - 21 * DAY) & (w.activity >= np.median(w.activity)) & (w.n_cards > 0)
    )
    for _ in range(counts[FraudPattern.CARD_TESTING]):
        _card_testing(w, cat, day0, rng, rows)
    for _ in range(counts[FraudPattern.STOLEN_CARD]):
        _stolen_card(w, cat, day0, rng, rows)
    for _ in range(counts[FraudPattern.ACCOUNT_TAKEOVER]):
        _account_takeover(w, cat, day0, rng, rows, victims)
    for _ in range(counts[FraudPattern.RING]):
        _ring(w, cat, day0, rng, rows)
    for _ in range(counts[FraudPattern.COLLUSION]):
        _collusion(w, cat, day0, rng, rows)


# --- Writing ------------------------------------------------------------------------------------
class _ParquetSink:
    """Validate and append row groups to one table; the file appears only when complete."""

    def __init__(self, directory: Path, table: str) -> None:
        self.model = TABLES[table]
        self.schema = arrow_schema(self.model)
        self.path = directory / f"{table}.parquet"
        self.tmp = self.path.with_suffix(".parquet.tmp")
        # the key is unique: a dictionary would only cost time
        dictionary = [f.name for f in self.schema if f.name != self.model.key]
        self.writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self.tmp,
            self.schema,
            compression="zstd",
            use_dictionary=dictionary,
            write_statistics=[self.model.time_column or self.model.key],  # row groups are days: prune by time
        )
        self.rows = 0

    def write(self, at: pa.Table) -> None:
        at = at.cast(self.schema)
        validate(at, self.model)
        assert self.writer is not None
        self.writer.write_table(at)
        self.rows += at.num_rows

    def close(self) -> None:
        assert self.writer is not None
        self.writer.close()
        self.writer = None
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.tmp.unlink(missing_ok=True)


def _write_small(at: pa.Table, directory: Path, table: str) -> int:
    """Small tables go through ``storage.write_table`` (validation + atomic write)."""
    write_table(at.to_pandas(), directory, table)
    return at.num_rows


def _write_large(at: pa.Table, directory: Path, table: str) -> int:
    """Large tables skip the pandas round trip (Python strings would triple the memory)."""
    sink = _ParquetSink(directory, table)
    try:
        sink.write(at)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return at.num_rows


@dataclass
class _Ids:
    """String tables for entities whose ids are known up front."""

    item: pa.Array
    creator: pa.Array
    ip: pa.Array
    user: _IdCache = field(default_factory=lambda: _IdCache(_user_ids))
    device: _IdCache = field(default_factory=lambda: _IdCache(_device_ids))

    @staticmethod
    def make(w: _World) -> _Ids:
        item_rank = np.empty(len(w.item_created), dtype=np.int64)
        item_rank[np.argsort(w.item_created, kind="stable")] = np.arange(len(w.item_created))
        creator_rank = np.empty(len(w.creator_joined), dtype=np.int64)
        creator_rank[np.argsort(w.creator_joined, kind="stable")] = np.arange(len(w.creator_joined))
        x = (
            np.arange(len(w.ip_country), dtype=np.uint64) * np.uint64(2246822519) + np.uint64(0x5BD1E995)
        ) & np.uint64(0xFFFFFFFF)
        octets = [((x >> np.uint64(s)) & np.uint64(255)).astype(np.int64) for s in (24, 16, 8, 0)]
        octets[0] = 11 + octets[0] % 212  # public-looking first octet
        parts = [pc.cast(pa.array(o), pa.string()) for o in octets]
        ip = pc.binary_join_element_wise(*parts, ".")
        return _Ids(_seq_ids("i", item_rank + 1, 7), _seq_ids("c", creator_rank + 1, 6), ip)


def _user_ids(idx: np.ndarray) -> pa.Array:
    return _opaque_ids("u", idx, 0x1B873593)


def _device_ids(idx: np.ndarray) -> pa.Array:
    return _opaque_ids("dev", idx, 0x68E31DA4)


def _card_ids(idx: np.ndarray) -> pa.Array:
    return _opaque_ids("fp", idx, 0x2C1B3C6D)


class _IdCache:
    """Id strings of entity indices 0..k, built once and grown as new entities appear."""

    def __init__(self, make: Any) -> None:
        self.make = make
        self.values: pa.Array = pa.array([], pa.string())

    def take(self, idx: np.ndarray) -> pa.Array:
        idx = np.asarray(idx, dtype=np.int64)
        need = int(idx.max()) + 1 if len(idx) else 0
        have = len(self.values)
        if need > have:
            grow = max(need, have + have // 4)
            self.values = pa.concat_arrays([self.values, self.make(np.arange(have, grow))])
        return self.values.take(pa.array(idx))


def _finish_day(
    w: _World,
    ids: _Ids,
    rows: _DayRows,
    counters: dict[str, int],
    sink: _ParquetSink,
    payments: dict[str, list[Any]],
) -> None:
    """Sort the day, add purchase rows, number sessions and events, write interactions, keep payments."""
    if rows.pay:
        pay = rows.payments()
        o = np.argsort(pay["time"], kind="stable")
        offsets = np.concatenate([[0], np.cumsum(pay["n_items"])]).astype(np.int32)
        lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(pay["items"].astype(np.int64))).take(
            pa.array(o)
        )
        for k in ("user", "time", "device", "ip", "card", "billing", "creator", "pattern", "amount"):
            payments[k].append(np.asarray(pay[k])[o].astype(payments[k][0].dtype))
        payments["items"].append(lists)
        rep = pay["n_items"]
        rows.add_interactions(
            user=np.repeat(pay["user"], rep),
            item=pay["items"],
            etype=PURCHASE,
            time=np.repeat(pay["time"], rep),
            session=np.repeat(pay["session"], rep),
            device=np.repeat(pay["device"], rep),
            ip=np.repeat(pay["ip"], rep),
        )
    if not rows.inter:
        return
    it = rows.interactions()
    o = np.argsort(it["time"], kind="stable")
    it = {k: v[o] for k, v in it.items()}
    # session numbers in order of first event, continuing from the previous day
    _, first = np.unique(it["session"], return_index=True)
    rank = np.empty(rows.n_sessions, dtype=np.int64)
    present = np.unique(it["session"])
    rank[present[np.argsort(first, kind="stable")]] = np.arange(len(present))
    session = counters["session"] + rank[it["session"]]
    counters["session"] += len(present)
    n = len(o)
    event = counters["event"] + np.arange(n)
    counters["event"] += n
    at = pa.table(
        {
            "event_id": _seq_ids("e", event, 11),
            "user_id": ids.user.take(it["user"]),
            "item_id": ids.item.take(pa.array(it["item"].astype(np.int64))),
            "event_type": _ETYPE_ARR.take(pa.array(it["etype"].astype(np.int64))),
            "event_time": _ts(it["time"]),
            "session_id": _seq_ids("s", session, 10),
            "device_id": ids.device.take(it["device"]),
            "ip": ids.ip.take(pa.array(it["ip"].astype(np.int64))),
            "ip_country": _COUNTRY_ARR.take(pa.array(w.ip_country[it["ip"]].astype(np.int64))),
            "quantity": pa.array(np.ones(n, dtype=np.int64)),
        }
    )
    sink.write(at)


PAYMENT_CHUNK = 250_000  # rows per row group of payments.parquet, bounds the memory of the final write


def _write_payments(w: _World, ids: _Ids, payments: dict[str, list[Any]], out: Path) -> dict[str, np.ndarray]:
    """All payments in time order (each day was sorted), ids p000000001... in that order."""
    cols = {k: np.concatenate(v) for k, v in payments.items() if k != "items"}
    lists = pa.concat_arrays(payments["items"])
    card_country = np.asarray(w.card_country, dtype=np.int64)
    n = len(cols["time"])
    sink = _ParquetSink(out, "payments")
    try:
        for a in range(0, max(n, 1), PAYMENT_CHUNK):
            c = {k: v[a : a + PAYMENT_CHUNK] for k, v in cols.items()}
            part = lists.slice(a, len(c["time"]))
            flat = part.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
            off = np.asarray(part.offsets)
            offsets = pa.array(off - off[0], pa.int32())
            m = len(c["time"])
            sink.write(
                pa.table(
                    {
                        "payment_id": _seq_ids("p", np.arange(a + 1, a + m + 1), 9),
                        "user_id": ids.user.take(c["user"]),
                        "item_ids": pa.ListArray.from_arrays(offsets, ids.item.take(pa.array(flat))),
                        "payment_time": _ts(c["time"]),
                        "kind": _const("purchase", m),
                        "amount": pa.array(c["amount"].astype(np.float64)),
                        "currency": _const("EUR", m),
                        "card_fingerprint": _card_ids(c["card"]),
                        "card_bin_country": _take(_COUNTRY_ARR, card_country[c["card"]]),
                        "billing_country": _take(_COUNTRY_ARR, c["billing"]),
                        "device_id": ids.device.take(c["device"]),
                        "ip": ids.ip.take(pa.array(c["ip"])),
                        "ip_country": _take(_COUNTRY_ARR, w.ip_country[c["ip"]]),
                        "creator_id": ids.creator.take(pa.array(c["creator"])),
                        "fraud_pattern": _PATTERN_ARR.take(pa.array(c["pattern"])),
                    }
                )
            )
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return cols


def _disputes(w: _World, pay: dict[str, np.ndarray], out: Path) -> dict[str, Any]:
    """Chargebacks of most fraud and a few legitimate payments, 1-120 days later."""
    rng = _rng(w.cfg.seed, 20)
    pattern = pay["pattern"].astype(np.int64)
    n = len(pattern)
    prob = np.zeros(len(PATTERNS))
    for p, q in DISPUTE_PROB.items():
        prob[_P[p]] = q
    prob[NONE_CODE] = NOT_AS_DESCRIBED_RATE
    disputed = np.flatnonzero(rng.random(n) < prob[pattern])
    pat = pattern[disputed]
    reason = np.where(
        pat == NONE_CODE, 2, np.where(pat == _P[FraudPattern.FRIENDLY_FRAUD], 1, 0)
    )  # fraud, friendly_fraud, not_as_described
    median = np.where(reason == 2, 10.0, 24.0)
    days = np.clip(rng.lognormal(np.log(median), 0.55), 1.0, MAX_DISPUTE_DAYS)
    reported = pay["time"][disputed] + (days * DAY).astype(np.int64)
    o = np.argsort(reported, kind="stable")
    reasons = pa.array(
        [DisputeReason.FRAUD.value, DisputeReason.FRIENDLY_FRAUD.value, DisputeReason.NOT_AS_DESCRIBED.value]
    )
    at = pa.table(
        {
            "dispute_id": _seq_ids("d", np.arange(1, len(o) + 1), 8),
            "payment_id": _seq_ids("p", disputed[o] + 1, 9),
            "reason": reasons.take(pa.array(reason[o].astype(np.int64))),
            "reported_time": _ts(reported[o]),
        }
    )
    _write_small(at, out, "disputes")
    by_reason = {r.value: int((reason == i).sum()) for i, r in enumerate(DisputeReason)}
    return {"total": len(o), "by_reason": by_reason, "reported_after_end": int((reported >= w.end).sum())}


@dataclass(frozen=True)
class _AllUsers:
    signup: np.ndarray
    country: np.ndarray
    dob: np.ndarray
    true_dob: np.ndarray
    kyc: np.ndarray
    guest: np.ndarray
    role: np.ndarray
    ring: np.ndarray


def _all_users(w: _World) -> _AllUsers:
    a = w.accounts
    role = np.zeros(w.n, dtype=np.int64)
    for col in w.colluders:
        for u, *_ in col.buyers:
            if u < w.n:
                role[u] = ROLE_COLLUDER
    extra_dob = np.array(a.dob, dtype=np.int64)
    return _AllUsers(
        signup=np.concatenate([w.signup, np.array(a.signup, dtype=np.int64)]),
        country=np.concatenate([w.country, np.array(a.country, dtype=np.int64)]),
        dob=np.concatenate([w.dob, extra_dob]),
        true_dob=np.concatenate([w.true_dob, extra_dob]),
        kyc=np.concatenate([w.kyc, np.array(a.kyc, dtype=np.int64)]),
        guest=np.concatenate([w.guest, np.array(a.guest, dtype=bool)]),
        role=np.concatenate([role, np.array(a.role, dtype=np.int64)]),
        ring=np.concatenate([np.full(w.n, -1), np.array(a.ring, dtype=np.int64)]),
    )


def _date(days: np.ndarray) -> pa.Array:
    return pa.array(days.astype(np.int32), type=pa.date32(), mask=days < 0)


def _write_users(w: _World, u: _AllUsers, out: Path) -> dict[str, int]:
    o = np.argsort(u.signup, kind="stable")
    at = pa.table(
        {
            "user_id": _user_ids(o),
            "signup_time": _ts(u.signup[o]),
            "date_of_birth": _date(u.dob[o]),
            "country": _take(_COUNTRY_ARR, np.where(u.guest, -1, u.country)[o]),
            "kyc_status": pa.array([k.value for k in _KYC]).take(pa.array(u.kyc[o].astype(np.int64))),
            "is_guest": pa.array(u.guest[o]),
        }
    )
    _write_small(at, out, "users")
    # truth outside the event model: who is really a minor, and who was planted as a fraudster
    age_days = w.start_day - u.true_dob
    true_minor = (age_days < 18 * 365.25) & (u.dob >= 0)
    declared_minor = (w.start_day - u.dob < 18 * 365.25) & (u.dob >= 0)
    truth = pa.table(
        {
            "user_id": _user_ids(o),
            "true_minor": pa.array(true_minor[o]),
            "true_date_of_birth": _date(np.where(u.dob >= 0, u.true_dob, -1)[o]),
            "fraud_role": pa.array(list(ROLES)).take(pa.array(u.role[o])),
            "ring_id": pa.array(u.ring[o], mask=u.ring[o] < 0),
        }
    )
    (out / TRUTH_DIR).mkdir(parents=True, exist_ok=True)
    path = out / TRUTH_DIR / USERS_TRUTH
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(truth, tmp, compression="zstd")
    os.replace(tmp, path)
    return {
        "declared_minors": int(declared_minor.sum()),
        "hidden_minors": int((true_minor & ~declared_minor).sum()),
        "fraud_accounts": int((u.role > 0).sum()),
    }


def _write_creators_items(w: _World, ids: _Ids, out: Path) -> tuple[int, int]:
    o = np.argsort(w.creator_joined, kind="stable")
    cu = w.creator_user[o]
    creators = pa.table(
        {
            "creator_id": ids.creator.take(pa.array(o)),
            "user_id": _take(_user_ids(np.maximum(cu, 0)), np.where(cu < 0, -1, np.arange(len(cu)))),
            "joined_time": _ts(w.creator_joined[o]),
            "country": _take(_COUNTRY_ARR, w.creator_country[o]),
        }
    )
    _write_small(creators, out, "creators")
    o = np.argsort(w.item_created, kind="stable")
    tags = pa.ListArray.from_arrays(
        pa.array(w.item_tags_offsets.astype(np.int32)), pa.array(_TAG_VOCAB).take(pa.array(w.item_tags_flat))
    ).take(pa.array(o))
    items = pa.table(
        {
            "item_id": ids.item.take(pa.array(o)),
            "creator_id": ids.creator.take(pa.array(w.item_creator[o])),
            "style": pa.array(list(STYLES)).take(pa.array(w.item_style[o])),
            "tags": tags,
            "price": pa.array(w.item_price[o]),
            "currency": _const("EUR", len(o)),
            "created_time": _ts(w.item_created[o]),
            "status": pa.array([s.value for s in _STATUS]).take(pa.array(w.item_status[o])),
        }
    )
    _write_small(items, out, "items")
    return creators.num_rows, items.num_rows


def _consent(w: _World, u: _AllUsers, out: Path) -> tuple[int, dict[str, dict[str, int]]]:
    """Consent receipts per user and purpose, and the final state of each for the summary."""
    rng = _rng(w.cfg.seed, 30)
    n = len(u.signup)
    policy_change = _to_us(POLICY_CHANGE)
    ev: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "purpose", "status", "time", "source")}

    def emit(mask: np.ndarray, purpose: int, status: int, t: np.ndarray, source: np.ndarray | int) -> None:
        idx = np.flatnonzero(mask)
        ev["user"].append(idx)
        ev["purpose"].append(np.full(len(idx), purpose))
        ev["status"].append(np.full(len(idx), status))
        ev["time"].append(t[idx])
        ev["source"].append(np.broadcast_to(np.asarray(source), (n,))[idx])

    summary: dict[str, dict[str, int]] = {}
    purposes = list(ConsentPurpose)
    can = ~u.guest
    for purpose, (p_given, p_refused) in CONSENT_AT_SIGNUP.items():
        pi = purposes.index(purpose)
        r = rng.random(n)
        state = np.where(r < p_given, C_GIVEN, np.where(r < p_given + p_refused, C_REFUSED, C_UNKNOWN))
        state = np.where(can, state, C_UNKNOWN)
        t = u.signup + rng.integers(5 * US, 120 * US, n)
        for s in (C_GIVEN, C_REFUSED):
            emit(state == s, pi, s, t, 0)
        # re-consent under the new policy version, shown as a banner
        tr = policy_change + rng.exponential(12 * DAY, n).astype(np.int64)
        renew = (state == C_GIVEN) & (t < policy_change) & (rng.random(n) < 0.75) & (tr < w.end)
        emit(renew, pi, C_RENEWED, tr, 2)
        t = np.where(renew, tr, t)
        state = np.where(renew, C_RENEWED, state)
        # later: some withdraw, some who refused or never answered consent after all
        t2 = t + rng.exponential(120 * DAY, n).astype(np.int64)
        r2 = rng.random(n)
        valid = (state == C_GIVEN) | (state == C_RENEWED)
        withdraw = valid & (r2 < 0.14) & (t2 < w.end)
        late = can & ~valid & (r2 < 0.2) & (t2 < w.end)
        emit(withdraw, pi, C_WITHDRAWN, t2, 1)
        emit(late, pi, C_GIVEN, t2, np.where(rng.random(n) < 0.7, 2, 1))
        state = np.select([withdraw, late], [C_WITHDRAWN, C_GIVEN], state)
        # and some of those who withdrew come back
        t3 = t2 + rng.exponential(30 * DAY, n).astype(np.int64)
        back = withdraw & (rng.random(n) < 0.4) & (t3 < w.end)
        emit(back, pi, C_RENEWED, t3, np.where(rng.random(n) < 0.5, 2, 1))
        state = np.where(back, C_RENEWED, state)
        counts = np.bincount(state, minlength=len(_CONSENT_STATUSES))
        summary[purpose.value] = {s.value: int(c) for s, c in zip(_CONSENT_STATUSES, counts, strict=True)}

    cols = {k: np.concatenate(v) for k, v in ev.items()}
    o = np.argsort(cols["time"], kind="stable")
    cols = {k: v[o] for k, v in cols.items()}
    user_country = u.country[cols["user"]]
    jurisdiction = np.where(_IS_EEA[user_country], "EU", np.asarray(COUNTRIES)[user_country])
    at = pa.table(
        {
            "receipt_id": _seq_ids("r", np.arange(1, len(o) + 1), 9),
            "user_id": _user_ids(cols["user"]),
            "purpose": pa.array([p.value for p in purposes]).take(pa.array(cols["purpose"])),
            "status": pa.array([s.value for s in _CONSENT_STATUSES]).take(pa.array(cols["status"])),
            "event_time": _ts(cols["time"]),
            "source": pa.array(list(_SOURCES)).take(pa.array(cols["source"])),
            "policy_version": pa.array(np.where(cols["time"] < policy_change, POLICY_OLD, POLICY_NEW)),
            "jurisdiction": pa.array(jurisdiction),
        }
    )
    return _write_large(at, out, "consent_events"), summary


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    ) as bar:
        task = bar.add_task("simulating days", total=total)
        yield lambda: bar.advance(task)


def simulate_to_dir(cfg: SimulationConfig, out: Path, progress: bool = False) -> dict[str, Any]:
    """Simulate the marketplace into ``out`` (one parquet file per table plus ``truth/``).

    Returns a JSON-able summary: rows per table, fraud rate, payments per fraud pattern,
    disputes, users per consent state, minors and the run time in seconds.
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    w = _make_world(cfg)
    ids = _Ids.make(w)
    k = len(FRAUD_MIX)
    quota = _Quota(offset=_rng(cfg.seed, 2).random(k), total=np.zeros(k))
    counters = {"session": 1, "event": 1}
    payments: dict[str, list[Any]] = {
        k: [np.zeros(0, dtype=np.int64)]
        for k in ("user", "time", "device", "ip", "card", "billing", "creator", "pattern")
    }
    payments["amount"] = [np.zeros(0)]
    payments["items"] = [pa.array([], pa.list_(pa.int64()))]
    sink = _ParquetSink(out, "interactions")
    try:
        with _progress(progress, cfg.days) as advance:
            for d in range(cfg.days):
                day0 = w.start + d * DAY
                cat = _catalogue(w, d, day0)
                rows = _DayRows()
                if cat is not None:
                    legit = _legit_day(w, cat, d, day0, _rng(cfg.seed, 10, d), rows)
                    _fraud_day(w, cat, day0, _rng(cfg.seed, 11, d), rows, legit, quota)
                _finish_day(w, ids, rows, counters, sink, payments)
                advance()
        sink.close()
    except BaseException:
        sink.abort()
        raise
    pay = _write_payments(w, ids, payments, out)
    disputes = _disputes(w, pay, out)
    users = _all_users(w)
    minors = _write_users(w, users, out)
    n_creators, n_items = _write_creators_items(w, ids, out)
    n_consent, consent = _consent(w, users, out)

    n_pay = len(pay["time"])
    by_pattern = np.bincount(pay["pattern"].astype(np.int64), minlength=len(PATTERNS))
    fraud = n_pay - int(by_pattern[NONE_CODE])
    return {
        "out": str(out),
        "config": {"users": cfg.users, "days": cfg.days, "seed": cfg.seed, "start": cfg.start.isoformat()},
        "end": dt.datetime.fromtimestamp(w.end / US, tz=dt.UTC).isoformat(),
        "rows": {
            "users": len(users.signup),
            "creators": n_creators,
            "items": n_items,
            "interactions": sink.rows,
            "payments": n_pay,
            "disputes": disputes["total"],
            "consent_events": n_consent,
        },
        "fraud_rate": round(fraud / n_pay, 5) if n_pay else 0.0,
        "payments_by_pattern": {p.value: int(by_pattern[_P[p]]) for p in (FraudPattern.NONE, *FRAUD_MIX)},
        "disputes": disputes,
        "users_by_consent_state": consent,
        "minors": {"declared": minors["declared_minors"], "hidden": minors["hidden_minors"]},
        "fraud_accounts": minors["fraud_accounts"],
        "truth": f"{TRUTH_DIR}/{USERS_TRUTH}",
        "seconds": round(time.perf_counter() - t_start, 2),
    }
