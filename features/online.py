"""The online path: one real-time update function and the online feature vector of a payment.

Design (why online equals offline exactly):

* Every fraud feature is a function of the events that happened strictly before the
  payment, plus the payment itself (see `features.payment_features`). The online store
  therefore keeps the *events*, not pre-aggregated values: per user, card, device and IP
  a log of recent payment records (30 days plus a day of lateness), the disputes per
  user/card/creator with their reported time, the first time a user used each
  card/device/country, and one index row per payment (to route a dispute to its user, card
  and creator; a creator's counts are read from it). Profiles (users, items) are Feast
  feature views, materialised from the event tables and pushed by `update_online` when a
  user or item event arrives.
* `update_online` appends an event (idempotent: the same event twice changes nothing,
  arrival order does not matter) and is called by both the API's event ingestion and the
  scoring path, so a card-testing burst is visible to the very next score.
* `online_payment_vector` reads the state of the payment's entities in one round trip (on
  Redis one script call that also reads the Feast profile hashes) and computes the vector
  with the same definitions as the offline SQL (integer cents, the same window edges). The
  parity tests replay a simulated stream on both backends and compare every value.

Two backends, chosen by settings: SQLite (a file next to Feast's SQLite online store) and
Redis (the same server as Feast's Redis online store, keys ``aipic:<project>:...``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import math
import sqlite3
import struct
import threading
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from features.events import Creator, Dispute, Item, Payment, PaymentKind, User
from features.payment_features import (
    CREATOR_DISPUTE_WINDOWS,
    DAY,
    HISTORY_WINDOW,
    HOUR,
    PAYMENT_FEATURE_NAMES,
    US,
    VELOCITY_ENTITIES,
    WINDOWS,
)

if TYPE_CHECKING:
    import redis
    from feast import FeatureStore

    from features.settings import Settings

#: How long payment records stay in the per-entity logs: the longest window plus the
#: lateness an event may arrive with and still be counted exactly.
LATENESS_US = DAY
RETENTION_US = WINDOWS[HISTORY_WINDOW] + LATENESS_US
#: Entities with a log of payment records (creators' features are counts: see the read paths).
LOG_ENTITIES = VELOCITY_ENTITIES
#: What `delete_entities` accepts (entity name -> what is keyed by it).
ERASABLE = ("user", "card", "device", "ip", "creator", "item", "payment")
_SEP = "\x1f"
_U32 = struct.Struct("<I")
_new_tuple = tuple.__new__
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_WINDOW_ITEMS = sorted(WINDOWS.items(), key=lambda kv: kv[1])
HISTORY_US = WINDOWS[HISTORY_WINDOW]
_WINDOW_WIDTHS = tuple(width for _, width in _WINDOW_ITEMS)
#: Per velocity entity, per window (narrowest first): the count, sum, mean and max feature names.
_VELOCITY_NAMES = {
    ent: tuple(
        (f"{ent}_count_{w}", f"{ent}_amount_sum_{w}", f"{ent}_amount_mean_{w}", f"{ent}_amount_max_{w}")
        for w, _ in _WINDOW_ITEMS
    )
    for ent in VELOCITY_ENTITIES
}
_CREATOR_DISPUTE_WIDTHS = tuple(WINDOWS[w] for w in CREATOR_DISPUTE_WINDOWS)
#: Column of the SQLite payment index naming each erasable entity that payments mention.
_PAYMENT_COLUMN = {"payment": "payment_id", "user": "user_id", "card": "card", "device": "device", "ip": "ip"}


class OnlineFeatureError(ValueError):
    """An event cannot be used online (wrong kind, bad identifier)."""


def to_us(t: dt.datetime) -> int:
    """Exact integer microseconds since the epoch (naive datetimes are UTC, as in storage)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    d = t - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def to_cents(amount: float) -> int:
    """Same rounding as the offline SQL: ``floor(amount * 100 + 0.5)``."""
    return math.floor(amount * 100 + 0.5)


_KEY_INDEX = {"user": 3, "card": 4, "device": 5, "ip": 6, "creator": 8}


class PaymentRecord(NamedTuple):
    """What the online state keeps of one payment (a tuple: decoding thousands must be cheap)."""

    payment_id: str
    ts: int
    cents: int
    user_id: str
    card: str | None
    device: str | None
    ip: str | None
    ip_country: str | None
    creator_id: str | None
    # request-only attributes: used for the vector, not kept in the logs
    bin_country: str | None = None
    billing_country: str | None = None
    item_ids: tuple[str, ...] = ()

    @classmethod
    def from_payment(cls, p: Payment) -> PaymentRecord:
        if p.kind != PaymentKind.PURCHASE:
            raise OnlineFeatureError(f"payment {p.payment_id}: only purchases are scored, not {p.kind}")
        rec = cls(
            p.payment_id,
            to_us(p.payment_time),
            to_cents(p.amount),
            p.user_id,
            p.card_fingerprint,
            p.device_id,
            p.ip,
            p.ip_country,
            p.creator_id,
            p.card_bin_country,
            p.billing_country,
            tuple(p.item_ids),
        )
        for v in (rec.payment_id, rec.user_id, rec.card, rec.device, rec.ip, rec.ip_country, rec.creator_id):
            if v is not None and (_SEP in v or v == ""):
                raise OnlineFeatureError(f"payment {p.payment_id}: empty identifier or control character")
        return rec

    def key(self, entity: str) -> str | None:
        """The record's key for an entity of `LOG_ENTITIES`."""
        return cast("str | None", self[_KEY_INDEX[entity]])

    def encode(self) -> str:
        parts = (self.ts, self.payment_id, self.cents, self.user_id, self.card, self.device, self.ip)
        rest = (self.ip_country, self.creator_id)
        return _SEP.join("" if v is None else str(v) for v in (*parts, *rest))

    @classmethod
    def decode(cls, s: str | bytes) -> PaymentRecord:
        text = s.decode() if isinstance(s, bytes) else s
        ts, pid, cents, user, card, device, ip, ipc, creator = text.split(_SEP)
        # tuple.__new__ skips the generated __new__ (a read decodes dozens of records)
        fields = (pid, int(ts), int(cents), user, card or None, device or None, ip or None, ipc or None)
        return _new_tuple(cls, (*fields, creator or None, None, None, ()))


class _DecodeCache:
    """`PaymentRecord.decode` of stored log members, cached: a payment's record is read back by
    every later payment of its user, card, device and IP for 30 days (a read decodes dozens).

    A plain insertion-ordered dict, oldest out first: one object for the garbage collector (the
    records, tuples of strings and ints, are not tracked), where an `functools.lru_cache` would
    add a tracked link per entry and lengthen every full collection. Erasure clears it
    (`RedisEventState.delete`).
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._records: dict[bytes, PaymentRecord] = {}

    def __call__(self, member: bytes) -> PaymentRecord:
        rec = self._records.get(member)
        if rec is None:
            rec = self._records[member] = PaymentRecord.decode(member)
            if len(self._records) > self.maxsize:
                with contextlib.suppress(StopIteration, KeyError, RuntimeError):  # another thread won
                    del self._records[next(iter(self._records))]
        return rec

    def lookup(self) -> Callable[[bytes], PaymentRecord | None]:
        """The cache's plain ``get`` (a hit without a Python call in between)."""
        return self._records.get

    def cache_clear(self) -> None:
        self._records = {}


decode_member = _DecodeCache(maxsize=65_536)


@dataclass(frozen=True)
class ProfileQuery:
    """Rows of one Feast profile view to read together with the state (same round trip).

    Built by `OnlineFeatures` from Feast's own key functions: ``redis_keys`` are the entity
    hashes and ``redis_fields`` the mmh3 field names; ``sqlite_table`` and ``sqlite_keys``
    the table and serialized entity keys of Feast's SQLite store.
    """

    view: str
    fields: tuple[str, ...]
    redis_keys: tuple[bytes, ...] = ()
    redis_fields: tuple[bytes, ...] = ()
    sqlite_table: str = ""
    sqlite_keys: tuple[bytes, ...] = ()


def parse_value(raw: bytes | None) -> Any:
    """A Feast ``Value`` protobuf (as stored online) -> Python scalar (None if unset)."""
    if not raw:
        return None
    return _parse_value_bytes(raw)


@functools.lru_cache(maxsize=8192)
def _parse_value_bytes(raw: bytes) -> Any:
    """Cached: profile values repeat (KYC status, countries, prices) and scalars are immutable."""
    from feast.protos.feast.types.Value_pb2 import Value

    v = Value.FromString(raw)
    kind = v.WhichOneof("val")
    return None if kind is None or kind == "null_val" else getattr(v, kind)


def _profile_dicts(fields: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for values in rows:
        parsed = dict(zip(fields, values, strict=True))
        out.append(parsed if any(v is not None for v in parsed.values()) else None)
    return out


@dataclass
class Snapshot:
    """Everything the vector of one payment depends on, read in one go from the state."""

    logs: dict[str, list[PaymentRecord]] = field(default_factory=dict)  # user/card/device/ip, (t - 30 d, t)
    creator_n: int = 0  # the creator's payments in (t - 30 d, t)
    creator_buyers: int = 0  # distinct buyers among them
    creator_same: int = 0  # how many of them this buyer made
    user_disputes: int = 0
    card_disputes: int = 0
    creator_disputes: dict[str, int] = field(default_factory=dict)  # "all", "7d", "30d"
    creator_prior: int = 0
    first_seen: dict[str, int | None] = field(default_factory=dict)  # "card" | "device" | "country"
    user_profile: dict[str, Any] | None = None
    items: list[tuple[int, int]] = field(default_factory=list)  # (price_cents, created_ts)
    profiles: list[list[dict[str, Any] | None]] = field(default_factory=list)  # per ProfileQuery


# --- the vector (pure) ------------------------------------------------------------------------


def _flag(cond: bool) -> float:
    return 1.0 if cond else 0.0


def _mismatch(a: str | None, b: str | None) -> float:
    return math.nan if a is None or b is None else _flag(a != b)


#: ``user_distinct_*`` features and the `PaymentRecord` field each counts.
_USER_DISTINCT = tuple(
    (f"user_distinct_{col}_{HISTORY_WINDOW}", PaymentRecord._fields.index(attr))
    for col, attr in (("cards", "card"), ("devices", "device"), ("ips", "ip"), ("countries", "ip_country"))
)


def compute_payment_vector(rec: PaymentRecord, snap: Snapshot) -> dict[str, float]:
    """The feature vector of ``rec`` from the state before it (same definitions as offline)."""
    t = rec.ts
    out: dict[str, float] = dict.fromkeys(PAYMENT_FEATURE_NAMES, math.nan)
    h = HISTORY_WINDOW
    # request
    out["amount"] = rec.cents / 100
    out["is_night"] = _flag((t // HOUR) % 24 < 6)
    out["is_weekend"] = _flag(((t // DAY) + 3) % 7 >= 5)
    out["bin_billing_mismatch"] = _mismatch(rec.bin_country, rec.billing_country)
    out["ip_bin_mismatch"] = _mismatch(rec.ip_country, rec.bin_country)
    out["ip_billing_mismatch"] = _mismatch(rec.ip_country, rec.billing_country)

    # velocity per entity: the log is strictly earlier, so add the current payment. Each record
    # goes to the narrowest window holding it; the nested windows are then running totals.
    widths = _WINDOW_WIDTHS
    nw = len(widths)
    for ent, names in _VELOCITY_NAMES.items():
        if rec.key(ent) is None:
            continue
        counts, sums, maxes = [0] * nw, [0] * nw, [rec.cents] * nw
        for r in snap.logs.get(ent, ()):
            b = bisect_right(widths, t - r.ts)  # the narrowest window with age < width
            if b < nw:
                cents = r.cents
                counts[b] += 1
                sums[b] += cents
                if cents > maxes[b]:
                    maxes[b] = cents
        n, s, m = 1, rec.cents, rec.cents
        for b, (count_name, sum_name, mean_name, max_name) in enumerate(names):
            n += counts[b]
            s += sums[b]
            if maxes[b] > m:
                m = maxes[b]
            out[count_name] = float(n)
            out[sum_name] = s / 100
            out[mean_name] = s / n / 100
            out[max_name] = m / 100

    # user history (previous payments only) and profile
    ulog = snap.logs.get("user", [])
    n_prev = len(ulog)
    s_prev = sum(r.cents for r in ulog)
    ss_prev = sum(r.cents * r.cents for r in ulog)
    if n_prev > 0 and s_prev > 0:
        out[f"user_amount_ratio_mean_{h}"] = float(n_prev * rec.cents) / float(s_prev)
    var_num = n_prev * ss_prev - s_prev * s_prev
    if n_prev >= 2 and var_num > 0:
        out[f"user_amount_zscore_{h}"] = float(n_prev * rec.cents - s_prev) / math.sqrt(float(var_num))
    if ulog:
        out[f"user_secs_since_prev_payment_{h}"] = float(t - max(r.ts for r in ulog)) / US
    prof = snap.user_profile
    if prof is not None:
        if prof.get("signup_ts") is not None:
            out["user_account_age_days"] = float(t - int(prof["signup_ts"])) / DAY
        kyc = prof.get("kyc_status")
        if kyc is not None:
            out["user_kyc_verified"] = _flag(kyc == "verified")
            out["user_kyc_pending"] = _flag(kyc == "pending")
            out["user_kyc_failed"] = _flag(kyc == "failed")
        if prof.get("is_guest") is not None:
            out["user_is_guest"] = float(bool(prof["is_guest"]))
        out["user_country_ip_mismatch"] = _mismatch(rec.ip_country, prof.get("country"))
    for name, i in _USER_DISTINCT:
        values = {r[i] for r in ulog}
        values.add(rec[i])
        values.discard(None)
        out[name] = float(len(values))
    for what, attr in (("card", "card"), ("device", "device"), ("country", "ip_country")):
        if getattr(rec, attr) is not None:
            first = snap.first_seen.get(what)
            out[f"user_new_{what}"] = _flag(first is None or first >= t)
    out["user_disputes_reported"] = float(snap.user_disputes)

    # shared instruments
    for ent in ("card", "device", "ip"):
        if rec.key(ent) is not None:
            users = {r.user_id for r in snap.logs.get(ent, ())}
            users.add(rec.user_id)
            out[f"{ent}_distinct_users_{h}"] = float(len(users))
    if rec.card is not None:
        out["card_disputes_reported"] = float(snap.card_disputes)

    # creator
    if rec.creator_id is not None:
        d_all = snap.creator_disputes.get("all", 0)
        out["creator_prior_payments"] = float(snap.creator_prior)
        out["creator_disputes_reported"] = float(d_all)
        for w in CREATOR_DISPUTE_WINDOWS:
            out[f"creator_disputes_reported_{w}"] = float(snap.creator_disputes.get(w, 0))
        if snap.creator_prior > 0:
            out["creator_dispute_rate"] = float(d_all) / snap.creator_prior
        n_win = snap.creator_n + 1
        buyers = snap.creator_buyers + (0 if snap.creator_same else 1)
        same = snap.creator_same + 1
        out[f"creator_payments_{h}"] = float(n_win)
        out[f"creator_distinct_buyers_{h}"] = float(buyers)
        out[f"creator_repeat_share_{h}"] = float(n_win - buyers) / n_win
        out[f"creator_buyer_share_{h}"] = float(same) / n_win

    # items
    out["items_count"] = float(len(rec.item_ids))
    if snap.items:
        out["items_price_sum"] = sum(p for p, _ in snap.items) / 100
        out["items_price_max"] = max(p for p, _ in snap.items) / 100
        out["items_min_age_days"] = float(t - max(c for _, c in snap.items)) / DAY
    return out


# --- the event state ----------------------------------------------------------------------------


@dataclass
class StateBatch:
    """Columnar writes to the event state (one transaction / one pipeline)."""

    logs: list[tuple[str, str, int, str, str]] = field(default_factory=list)  # kind, key, ts, pid, record
    payments: list[tuple[str, int, str, str | None, str | None, str | None, str | None, str]] = field(
        default_factory=list
    )  # pid, ts, user, card, device, ip, creator, record
    first_seen: list[tuple[str, str, str, int]] = field(default_factory=list)  # user, what, value, ts
    disputes: list[tuple[str, str, str, int]] = field(default_factory=list)  # kind, key, dispute_id, ts
    prune: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, key) -> drop ts below

    def add_payment(self, rec: PaymentRecord) -> None:
        enc = rec.encode()
        self.payments.append(
            (rec.payment_id, rec.ts, rec.user_id, rec.card, rec.device, rec.ip, rec.creator_id, enc)
        )
        for kind in LOG_ENTITIES:
            key = rec.key(kind)
            if key is None:
                continue
            self.logs.append((kind, key, rec.ts, rec.payment_id, enc))
            floor = rec.ts - RETENTION_US
            if self.prune.get((kind, key), floor - 1) < floor:
                self.prune[(kind, key)] = floor
        for what, value in (("card", rec.card), ("device", rec.device), ("country", rec.ip_country)):
            if value is not None:
                self.first_seen.append((rec.user_id, what, value, rec.ts))


class EventState(ABC):
    """Per-entity recent events, disputes and first-seen times of one Feast project."""

    project: str

    @abstractmethod
    def write(self, batch: StateBatch) -> None:
        """Apply a batch; idempotent (the same batch twice changes nothing).

        Atomic for the live path's batches (one payment or dispute); a bulk load may be
        applied in atomic parts (see `RedisEventState.write`).
        """

    @abstractmethod
    def payment_routes(self, payment_ids: Sequence[str]) -> dict[str, tuple[str, str | None, str | None]]:
        """payment id -> (user, card, creator) for the known ones (routes a dispute)."""

    @abstractmethod
    def snapshot(self, rec: PaymentRecord, profiles: Sequence[ProfileQuery] = ()) -> Snapshot:
        """The state strictly before ``rec.ts`` that its vector needs, plus the profile rows."""

    def snapshot_and_write(
        self, items: Sequence[tuple[PaymentRecord, Sequence[ProfileQuery], StateBatch]]
    ) -> list[Snapshot]:
        """For each payment in order: its snapshot, then its batch applied, so a later payment
        of the list sees the earlier ones (Redis: one atomic script per payment, all in one
        round trip)."""
        out = []
        for rec, profiles, batch in items:
            out.append(self.snapshot(rec, profiles))
            self.write(batch)
        return out

    @abstractmethod
    def delete(self, entity: str, keys: Sequence[str]) -> int:
        """Erase everything keyed by these entities; return how many records went."""

    @abstractmethod
    def clear(self) -> None:
        """Drop this project's whole state."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release connections."""


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (project TEXT, kind TEXT, key TEXT, payment_id TEXT, ts INTEGER, record TEXT,
  PRIMARY KEY (project, kind, key, payment_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS log_ts ON log (project, kind, key, ts);
CREATE INDEX IF NOT EXISTS log_pid ON log (project, payment_id);
CREATE TABLE IF NOT EXISTS payment (project TEXT, payment_id TEXT, ts INTEGER, user_id TEXT, card TEXT,
  device TEXT, ip TEXT, creator_id TEXT, record TEXT, PRIMARY KEY (project, payment_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS payment_creator ON payment (project, creator_id, ts, user_id);
CREATE INDEX IF NOT EXISTS payment_user ON payment (project, user_id);
CREATE TABLE IF NOT EXISTS first_seen (project TEXT, user_id TEXT, what TEXT, value TEXT, ts INTEGER,
  PRIMARY KEY (project, user_id, what, value)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dispute (project TEXT, kind TEXT, key TEXT, dispute_id TEXT, ts INTEGER,
  PRIMARY KEY (project, kind, key, dispute_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dispute_ts ON dispute (project, kind, key, ts);
"""


class SqliteEventState(EventState):
    """The state in one SQLite file (local configuration). Thread-safe through one lock."""

    def __init__(self, path: Path, project: str, feast_db: Path | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.project = project
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SQLITE_SCHEMA)
        self._feast = feast_db is not None
        if feast_db is not None:  # Feast's online store, read in the same connection (profiles)
            self._conn.execute("ATTACH DATABASE ? AS feast", (str(feast_db),))

    def write(self, batch: StateBatch) -> None:
        p = self.project
        with self._lock:
            c = self._conn
            c.execute("BEGIN")
            try:
                c.executemany(
                    "INSERT OR IGNORE INTO payment VALUES (?,?,?,?,?,?,?,?,?)",
                    [(p, *row) for row in batch.payments],
                )
                c.executemany(
                    "INSERT OR IGNORE INTO log (project, kind, key, ts, payment_id, record) VALUES (?,?,?,?,?,?)",
                    [(p, *row) for row in batch.logs],
                )
                c.executemany(
                    "INSERT INTO first_seen VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET ts = min(ts, excluded.ts)",
                    [(p, *row) for row in batch.first_seen],
                )
                c.executemany(
                    "INSERT OR IGNORE INTO dispute VALUES (?,?,?,?,?)", [(p, *row) for row in batch.disputes]
                )
                c.executemany(
                    "DELETE FROM log WHERE project=? AND kind=? AND key=? AND ts < ?",
                    [(p, kind, key, floor) for (kind, key), floor in batch.prune.items()],
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def payment_routes(self, payment_ids: Sequence[str]) -> dict[str, tuple[str, str | None, str | None]]:
        out: dict[str, tuple[str, str | None, str | None]] = {}
        ids = list(payment_ids)
        with self._lock:
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                rows = self._conn.execute(
                    f"SELECT payment_id, user_id, card, creator_id FROM payment WHERE project=? "
                    f"AND payment_id IN ({','.join('?' * len(chunk))})",
                    [self.project, *chunk],
                ).fetchall()
                out.update({r[0]: (r[1], r[2], r[3]) for r in rows})
        return out

    def snapshot(self, rec: PaymentRecord, profiles: Sequence[ProfileQuery] = ()) -> Snapshot:
        p, t = self.project, rec.ts
        snap = Snapshot()
        lo = t - WINDOWS[HISTORY_WINDOW]
        with self._lock:
            c = self._conn
            for q in profiles:
                snap.profiles.append(self._profile_rows(q))
            for kind in VELOCITY_ENTITIES:
                key = rec.key(kind)
                if key is None:
                    continue
                rows = c.execute(
                    "SELECT record FROM log WHERE project=? AND kind=? AND key=? AND ts > ? AND ts < ?",
                    (p, kind, key, lo, t),
                ).fetchall()
                snap.logs[kind] = [PaymentRecord.decode(r[0]) for r in rows]
            if rec.creator_id is not None:
                row = c.execute(
                    "SELECT count(*), count(DISTINCT user_id), coalesce(sum(user_id = ?), 0) FROM payment "
                    "WHERE project=? AND creator_id=? AND ts > ? AND ts < ?",
                    (rec.user_id, p, rec.creator_id, lo, t),
                ).fetchone()
                snap.creator_n, snap.creator_buyers, snap.creator_same = (int(v) for v in row)

            def disputes(kind: str, key: str, since: int | None = None) -> int:
                q = "SELECT count(*) FROM dispute WHERE project=? AND kind=? AND key=? AND ts < ?"
                args: tuple[Any, ...] = (p, kind, key, t)
                if since is not None:
                    q += " AND ts > ?"
                    args = (*args, since)
                return int(c.execute(q, args).fetchone()[0])

            snap.user_disputes = disputes("user", rec.user_id)
            if rec.card is not None:
                snap.card_disputes = disputes("card", rec.card)
            if rec.creator_id is not None:
                snap.creator_disputes = {"all": disputes("creator", rec.creator_id)}
                for w in CREATOR_DISPUTE_WINDOWS:
                    snap.creator_disputes[w] = disputes("creator", rec.creator_id, t - WINDOWS[w])
                snap.creator_prior = int(
                    c.execute(
                        "SELECT count(*) FROM payment WHERE project=? AND creator_id=? AND ts < ?",
                        (p, rec.creator_id, t),
                    ).fetchone()[0]
                )
            rows = c.execute(
                "SELECT what, value, ts FROM first_seen WHERE project=? AND user_id=?", (p, rec.user_id)
            ).fetchall()
        seen = {(w, v): ts for w, v, ts in rows}
        snap.first_seen = {
            "card": seen.get(("card", rec.card)) if rec.card else None,
            "device": seen.get(("device", rec.device)) if rec.device else None,
            "country": seen.get(("country", rec.ip_country)) if rec.ip_country else None,
        }
        return snap

    def _profile_rows(self, q: ProfileQuery) -> list[dict[str, Any] | None]:
        if not self._feast:
            raise OnlineFeatureError("this event state was opened without Feast's online database")
        try:
            rows = self._conn.execute(
                f'SELECT entity_key, feature_name, value FROM feast."{q.sqlite_table}" '
                f"WHERE entity_key IN ({','.join('?' * len(q.sqlite_keys))})",
                q.sqlite_keys,
            ).fetchall()
        except sqlite3.OperationalError as exc:  # the view was never applied
            if "no such table" in str(exc):
                return [None] * len(q.sqlite_keys)
            raise
        by_key: dict[bytes, dict[str, Any]] = {}
        for key, name, value in rows:
            by_key.setdefault(key, {})[name] = parse_value(value)
        values = [[by_key.get(k, {}).get(f) for f in q.fields] for k in q.sqlite_keys]
        return _profile_dicts(q.fields, values)

    def delete(self, entity: str, keys: Sequence[str]) -> int:
        p = self.project
        col = _PAYMENT_COLUMN.get(entity)
        n = 0
        with self._lock:
            c = self._conn
            c.execute("BEGIN")
            try:
                for key in keys:
                    if col is not None:  # the payments mentioning the key leave every log
                        pids = [
                            r[0]
                            for r in c.execute(
                                f"SELECT payment_id FROM payment WHERE project=? AND {col}=?", (p, key)
                            ).fetchall()
                        ]
                        for pid in pids:
                            n += c.execute(
                                "DELETE FROM log WHERE project=? AND payment_id=?", (p, pid)
                            ).rowcount
                        n += c.execute(f"DELETE FROM payment WHERE project=? AND {col}=?", (p, key)).rowcount
                    if entity in LOG_ENTITIES:
                        n += c.execute(
                            "DELETE FROM log WHERE project=? AND kind=? AND key=?", (p, entity, key)
                        ).rowcount
                    if entity in ("user", "card", "creator"):
                        n += c.execute(
                            "DELETE FROM dispute WHERE project=? AND kind=? AND key=?", (p, entity, key)
                        ).rowcount
                    if entity == "user":
                        n += c.execute(
                            "DELETE FROM first_seen WHERE project=? AND user_id=?", (p, key)
                        ).rowcount
                    elif entity in ("card", "device"):
                        n += c.execute(
                            "DELETE FROM first_seen WHERE project=? AND what=? AND value=?", (p, entity, key)
                        ).rowcount
                    if entity == "creator":  # its all-time sales count goes; buyers keep their history
                        n += c.execute(
                            "UPDATE payment SET creator_id=NULL WHERE project=? AND creator_id=?", (p, key)
                        ).rowcount
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        return n

    def clear(self) -> None:
        with self._lock:
            for table in ("log", "payment", "first_seen", "dispute"):
                self._conn.execute(f"DELETE FROM {table} WHERE project=?", (self.project,))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


#: Everything the vector of one payment reads from Redis, in one call (one round trip, one reply).
#: The creator's distinct buyers in ``(lo, t)`` come from ``clast`` (each buyer's latest payment
#: with the creator): buyers whose latest payment is inside the window, plus those whose latest
#: is at or after ``t`` (a late or concurrent event) and who have a payment inside it (their
#: ``cbuy`` set). That is O(log n) per read however many sales the creator has.
#:
#: KEYS: 1-4 logs of the user, card, device, ip; 5-7 disputes of the user, card, creator;
#: 8 ``cpay:<creator>``; 9 ``clast:<creator>``; 10 ``first:<user>``; 11.. profile hashes.
#: An entity the payment does not name has '' in its places.
#: ARGV: 1 ``(lo``, 2 ``(t``, 3 ``t``, 4 the creator's ``cbuy`` prefix, 5 the buyer, 6-8 first-seen
#: members, 9 the number W of creator dispute windows, 10..9+W their ``(lo``; then the number of
#: profile groups and per group: key count, field count, fields.
_SNAPSHOT_FN = """
local function snapshot(KEYS, ARGV)
local lo, tx = ARGV[1], ARGV[2]
local out = {}
for i = 1, 4 do
  if KEYS[i] == '' then out[i] = false else out[i] = redis.call('ZRANGEBYSCORE', KEYS[i], lo, tx) end
end
out[5] = redis.call('ZCOUNT', KEYS[5], '-inf', tx)
if KEYS[6] == '' then out[6] = 0 else out[6] = redis.call('ZCOUNT', KEYS[6], '-inf', tx) end
local nw = tonumber(ARGV[9])
if KEYS[7] == '' then
  out[7] = false
else
  local buyers = redis.call('ZCOUNT', KEYS[9], lo, tx)
  for _, u in ipairs(redis.call('ZRANGEBYSCORE', KEYS[9], ARGV[3], '+inf')) do
    if redis.call('ZCOUNT', ARGV[4] .. u, lo, tx) > 0 then buyers = buyers + 1 end
  end
  local c = {redis.call('ZCOUNT', KEYS[8], lo, tx), buyers, redis.call('ZCOUNT', ARGV[4] .. ARGV[5], lo, tx),
    redis.call('ZCOUNT', KEYS[8], '-inf', tx), redis.call('ZCOUNT', KEYS[7], '-inf', tx)}
  for w = 1, nw do c[#c + 1] = redis.call('ZCOUNT', KEYS[7], ARGV[9 + w], tx) end
  out[7] = c
end
out[8] = redis.call('ZMSCORE', KEYS[10], ARGV[6], ARGV[7], ARGV[8])
local a, k = 10 + nw, 11
for _ = 1, tonumber(ARGV[a]) do
  local nk, nf = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local fields = {}
  for f = 1, nf do fields[f] = ARGV[a + 2 + f] end
  for _ = 1, nk do
    out[#out + 1] = redis.call('HMGET', KEYS[k], unpack(fields))
    k = k + 1
  end
  a = a + 2 + nf
end
return out
end
"""
_SNAPSHOT_LUA = _SNAPSHOT_FN + "return snapshot(KEYS, ARGV)\n"

#: Applies a batch of writes atomically in one call. Each key has one operation in ARGV: ``h n
#: f1 v1 .. fn vn`` (HSET), ``z score member`` (ZADD), ``LT``/``GT score member`` (ZADD LT/GT),
#: ``p (max`` (ZREMRANGEBYSCORE -inf (max).
_WRITE_FN = """
local function apply(KEYS, ARGV)
local a = 1
for i = 1, #KEYS do
  local op = ARGV[a]
  if op == 'h' then
    local n = tonumber(ARGV[a + 1])
    redis.call('HSET', KEYS[i], unpack(ARGV, a + 2, a + 1 + 2 * n))
    a = a + 2 + 2 * n
  elseif op == 'p' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[a + 1])
    a = a + 2
  elseif op == 'z' then
    redis.call('ZADD', KEYS[i], ARGV[a + 1], ARGV[a + 2])
    a = a + 3
  else
    redis.call('ZADD', KEYS[i], op, ARGV[a + 1], ARGV[a + 2])
    a = a + 3
  end
end
return #KEYS
end
"""
_WRITE_LUA = _WRITE_FN + "return apply(KEYS, ARGV)\n"

#: The scoring path's one call: the snapshot of a payment, then its writes, atomically (no other
#: client's command runs in between). KEYS: the snapshot's keys, then the writes' keys. ARGV: 1
#: the number of snapshot keys, 2 the number of snapshot arguments, the snapshot's arguments,
#: then the writes'.
_SCORE_LUA = (
    _SNAPSHOT_FN
    + _WRITE_FN
    + """
local nk, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local sk, sa, wk, wa = {}, {}, {}, {}
for i = 1, #KEYS do if i <= nk then sk[i] = KEYS[i] else wk[i - nk] = KEYS[i] end end
for i = 3, #ARGV do if i <= na + 2 then sa[i - 2] = ARGV[i] else wa[i - 2 - na] = ARGV[i] end end
local out = snapshot(sk, sa)
apply(wk, wa)
return out
"""
)
#: Keys per write-script call: a bulk load is split so that no call blocks Redis for long.
_WRITE_CHUNK = 2_000


def _ops_end(args: Sequence[str | int], start: int, n_ops: int) -> int:
    """Index in ``args`` just after ``n_ops`` operations of `_WRITE_LUA` that begin at ``start``."""
    a = start
    for _ in range(n_ops):
        op = args[a]
        a += 2 + 2 * int(args[a + 1]) if op == "h" else 2 if op == "p" else 3
    return a


#: After payments left a (creator, buyer) set: the buyer's latest time in ``clast`` follows it.
#: KEYS: 1 ``cbuy`` set, 2 ``clast``; ARGV: 1 the buyer.
_CLAST_FIX_LUA = """
local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #top == 0 then return redis.call('ZREM', KEYS[2], ARGV[1]) end
redis.call('ZADD', KEYS[2], top[2], ARGV[1])
return 0
"""


class RedisEventState(EventState):
    """The state in Redis (production): sorted sets scored by microseconds, one round trip per read.

    Keys (``P`` = ``aipic:<project>``): ``P:log:<kind>:<key>`` (records by time),
    ``P:disp:<kind>:<key>`` (dispute ids by reported time), ``P:first:<user>`` (``what:value``
    by first time, kept minimal with ``ZADD LT``), ``P:pay:<payment_id>`` (hash routing a
    dispute and erasure), ``P:cpay:<creator>`` (all payment ids by time), ``P:clast:<creator>``
    (buyer -> latest payment time, ``ZADD GT``), ``P:cbuy:<creator>\\x1f<buyer>`` (that buyer's
    payment ids with the creator by time), ``P:upay:<user>`` / ``P:xpay:<kind>:<key>`` (payment
    ids of a person or instrument, for erasure). A single Redis server (the read script builds
    ``cbuy`` key names itself, which Redis Cluster would refuse). A state written before the
    ``clast``/``cbuy`` keys existed has no creator counts: rebuild it (``aipic features build``).
    """

    def __init__(self, client: redis.Redis, project: str) -> None:
        self.client = client
        self.project = project
        self.prefix = f"aipic:{project}:"
        self._shas: dict[str, str] = {}
        self._local = threading.local()  # each thread's own connection (see `_send`)
        self._conns: list[Any] = []  # every one made, to close them all
        self._log = {kind: f"{self.prefix}log:{kind}:" for kind in LOG_ENTITIES}
        self._disp = {kind: f"{self.prefix}disp:{kind}:" for kind in ("user", "card", "creator")}
        self._dispute_windows = [str(len(CREATOR_DISPUTE_WINDOWS))]
        self._fix = client.register_script(_CLAST_FIX_LUA)
        self._apply = client.register_script(_WRITE_LUA)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _pair(self, creator: str, user: str) -> str:
        return f"{self.prefix}cbuy:{creator}{_SEP}{user}"

    def write(self, batch: StateBatch) -> None:
        """One script call per `_WRITE_CHUNK` keys (a live payment: one call, one command).

        A call is atomic. A bulk load's chunks go in one pipeline but not in one MULTI/EXEC:
        that would hold every reply until the last chunk ran (seconds for a full load, past
        the client's socket timeout). Writes are idempotent, so a load cut short is finished
        by running it again.
        """
        keys, args = self._write_ops(batch)
        if not keys:
            return
        if len(keys) <= _WRITE_CHUNK:
            self._apply(keys=keys, args=args)
            return
        pipe = self.client.pipeline(transaction=False)
        a = 0
        for i in range(0, len(keys), _WRITE_CHUNK):
            chunk = keys[i : i + _WRITE_CHUNK]
            b = _ops_end(args, a, len(chunk))
            self._apply(keys=chunk, args=args[a:b], client=pipe)
            a = b
        pipe.execute()

    def _write_ops(self, batch: StateBatch) -> tuple[list[str], list[str | int]]:
        """The batch as `_WRITE_LUA`'s keys and operations."""
        keys: list[str] = []
        args: list[str | int] = []
        for pid, ts, user, card, device, ip, creator, enc in batch.payments:
            keys.append(self._k("pay", pid))
            args += ("h", 7, "ts", ts, "user", user, "card", card or "", "rec", enc)
            args += ("device", device or "", "ip", ip or "", "creator", creator or "")
            keys.append(self._k("upay", user))
            args += ("z", ts, pid)
            for kind, key in (("card", card), ("device", device), ("ip", ip)):
                if key is not None:
                    keys.append(self._k("xpay", kind, key))
                    args += ("z", ts, pid)
            if creator is not None:
                keys += (self._k("cpay", creator), self._pair(creator, user), self._k("clast", creator))
                args += ("z", ts, pid, "z", ts, pid, "GT", ts, user)
        for kind, key, ts, _pid, enc in batch.logs:
            keys.append(self._log[kind] + key)
            args += ("z", ts, enc)
        for user, what, value, ts in batch.first_seen:
            keys.append(self._k("first", user))
            args += ("LT", ts, f"{what}:{value}")
        for kind, key, dispute_id, ts in batch.disputes:
            keys.append(self._k("disp", kind, key))
            args += ("z", ts, dispute_id)
        for (kind, key), floor in batch.prune.items():
            keys.append(self._log[kind] + key)
            args += ("p", f"({floor}")
        return keys, args

    def payment_routes(self, payment_ids: Sequence[str]) -> dict[str, tuple[str, str | None, str | None]]:
        pipe = self.client.pipeline(transaction=False)
        for pid in payment_ids:
            pipe.hmget(self._k("pay", pid), ["user", "card", "creator"])
        out: dict[str, tuple[str, str | None, str | None]] = {}
        for pid, (user, card, creator) in zip(payment_ids, pipe.execute(), strict=True):
            if user is not None:
                out[pid] = (user.decode(), card.decode() or None, creator.decode() or None)
        return out

    def snapshot(self, rec: PaymentRecord, profiles: Sequence[ProfileQuery] = ()) -> Snapshot:
        keys, args = self._snapshot_call(rec, profiles)
        return self._parse_snapshot(rec, profiles, self._eval(_SNAPSHOT_LUA, keys, args))

    def snapshot_and_write(
        self, items: Sequence[tuple[PaymentRecord, Sequence[ProfileQuery], StateBatch]]
    ) -> list[Snapshot]:
        """One `_SCORE_LUA` call per payment (atomic: its snapshot, then its writes), all sent in
        one round trip: Redis runs them in order, so a later payment sees the earlier ones."""
        calls = []
        for rec, profiles, batch in items:
            keys, args = self._snapshot_call(rec, profiles)
            wkeys, wargs = self._write_ops(batch)
            calls.append(([*keys, *wkeys], [len(keys), len(args), *args, *wargs]))
        replies = self._eval_many(_SCORE_LUA, calls)
        return [
            self._parse_snapshot(rec, profiles, reply)
            for (rec, profiles, _), reply in zip(items, replies, strict=True)
        ]

    def _load(self, script: str) -> str:
        sha = self._shas[script] = str(self.client.script_load(script))
        return sha

    def _eval(self, script: str, keys: Sequence[str | bytes], args: Sequence[str | bytes | int]) -> Any:
        return self._eval_many(script, [(keys, args)])[0]

    def _eval_many(
        self, script: str, calls: Sequence[tuple[Sequence[str | bytes], Sequence[str | bytes | int]]]
    ) -> list[Any]:
        """EVALSHA of a script (loaded once) for each call, all in one round trip, replies in order.

        Loaded again if the server lost its script cache (restart, SCRIPT FLUSH): then none of
        the calls ran. Any other error reply is raised.
        """
        from redis.exceptions import NoScriptError

        def evalsha(sha: str) -> list[Any]:
            return self._send([("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls])

        replies = evalsha(self._shas.get(script) or self._load(script))
        if any(isinstance(r, NoScriptError) for r in replies):
            replies = evalsha(self._load(script))
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies

    def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Commands on this thread's own connection, in one write; their replies (error replies as
        exception objects).

        The hot path skips the client's pool (measured: ~0.07 ms of a ~0.2 ms call); the
        connection carries the client's settings (socket timeouts), and a connection error is
        retried by the client's own `Retry` (``redis_retries``, no backoff) on a new connection.
        Re-sending is safe: the scripts are idempotent (their writes are ZADD/HSET of the same
        values, their reads exclude the payment's own time).
        """
        from redis.exceptions import ResponseError

        def attempt() -> list[Any]:
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self.client.connection_pool.make_connection()
                self._conns.append(conn)
            try:
                conn.send_packed_command(conn.pack_commands(commands))
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(conn.read_response())
                    except ResponseError as exc:  # an error reply: the connection is still in step
                        replies.append(exc)
                return replies
            except BaseException:
                self._drop(conn)  # out of step with the server (or gone): never reuse it
                raise

        retry = self.client.get_retry()  # type: ignore[attr-defined]  # (types-redis predates it)
        return attempt() if retry is None else retry.call_with_retry(attempt, lambda _exc: None)

    def _drop(self, conn: Any) -> None:
        conn.disconnect()
        self._local.conn = None
        with contextlib.suppress(ValueError):
            self._conns.remove(conn)

    def _snapshot_call(
        self, rec: PaymentRecord, profiles: Sequence[ProfileQuery]
    ) -> tuple[list[str | bytes], list[str | bytes | int]]:
        """`_SNAPSHOT_LUA`'s keys and arguments for the payment ``rec``."""
        t = rec.ts
        lo, tx = f"({t - HISTORY_US}", f"({t}"
        user, card, device, ip, creator = rec.user_id, rec.card, rec.device, rec.ip, rec.creator_id
        log, disp, p = self._log, self._disp, self.prefix
        keys: list[str | bytes] = [
            log["user"] + user,
            "" if card is None else log["card"] + card,
            "" if device is None else log["device"] + device,
            "" if ip is None else log["ip"] + ip,
            disp["user"] + user,
            "" if card is None else disp["card"] + card,
            "" if creator is None else disp["creator"] + creator,
            "" if creator is None else f"{p}cpay:{creator}",
            "" if creator is None else f"{p}clast:{creator}",
            f"{p}first:{user}",
        ]
        args: list[str | bytes | int] = [
            lo,
            tx,
            t,
            "" if creator is None else f"{p}cbuy:{creator}{_SEP}",
            user,
            f"card:{card}",
            f"device:{device}",
            f"country:{rec.ip_country}",
            *self._dispute_windows,
            *(f"({t - w}" for w in _CREATOR_DISPUTE_WIDTHS),
            len(profiles),
        ]
        for q in profiles:
            keys += q.redis_keys
            args += (len(q.redis_keys), len(q.redis_fields), *q.redis_fields)
        return keys, args

    def _parse_snapshot(self, rec: PaymentRecord, profiles: Sequence[ProfileQuery], reply: Any) -> Snapshot:
        card, device = rec.card, rec.device
        snap = Snapshot()
        cached, decode = decode_member.lookup(), decode_member
        logs = snap.logs
        for kind, members in zip(VELOCITY_ENTITIES, reply[:4], strict=True):
            if members is not None:
                records = [cached(m) or decode(m) for m in members]
                if len({r.payment_id for r in records}) != len(records):
                    records = _one_per_payment(records)  # a duplicate sent with other content
                logs[kind] = records
        snap.user_disputes = int(reply[4])
        snap.card_disputes = int(reply[5])
        c = reply[6]
        if c is not None:
            snap.creator_n, snap.creator_buyers, snap.creator_same, snap.creator_prior, d_all = c[:5]
            snap.creator_disputes = {"all": d_all, **dict(zip(CREATOR_DISPUTE_WINDOWS, c[5:], strict=True))}
        scores = reply[7]
        snap.first_seen = {
            "card": None if card is None or scores[0] is None else int(scores[0]),
            "device": None if device is None or scores[1] is None else int(scores[1]),
            "country": None if rec.ip_country is None or scores[2] is None else int(scores[2]),
        }
        i = 8
        for q in profiles:
            n = len(q.redis_keys)
            rows = [[parse_value(v) for v in values] for values in reply[i : i + n]]
            snap.profiles.append(_profile_dicts(q.fields, rows))
            i += n
        return snap

    def delete(self, entity: str, keys: Sequence[str]) -> int:
        decode_member.cache_clear()  # no decoded copy of an erased payment stays in memory
        c = self.client
        n = 0
        for key in keys:
            pids: list[str] = []
            if entity == "payment":
                pids = [key]
            elif entity == "user":
                pids = [m.decode() for m in c.zrange(self._k("upay", key), 0, -1)]
            elif entity in ("card", "device", "ip"):
                pids = [m.decode() for m in c.zrange(self._k("xpay", entity, key), 0, -1)]
            n += self._remove_payments(
                pids, first_member=f"{entity}:{key}" if entity in ("card", "device") else None
            )
            doomed: list[str] = []
            if entity in LOG_ENTITIES:
                doomed.append(self._k("log", entity, key))
            if entity in ("user", "card", "creator"):
                doomed.append(self._k("disp", entity, key))
            if entity == "user":
                doomed += [self._k("first", key), self._k("upay", key)]
            if entity in ("card", "device", "ip"):
                doomed.append(self._k("xpay", entity, key))
            if entity == "creator":  # its sales, buyers and per-buyer sets; buyers keep their history
                buyers = [m.decode() for m in c.zrange(self._k("clast", key), 0, -1)]
                doomed += [self._k("cpay", key), self._k("clast", key), *(self._pair(key, u) for u in buyers)]
            if doomed:
                n += int(c.delete(*doomed))
        return n

    def _remove_payments(self, pids: Sequence[str], *, first_member: str | None) -> int:
        """Remove payments from every log and index (and a card/device from their users' first-seen)."""
        if not pids:
            return 0
        c = self.client
        pipe = c.pipeline(transaction=False)
        for pid in pids:
            pipe.hget(self._k("pay", pid), "rec")
        encs = pipe.execute()
        pipe = c.pipeline(transaction=True)
        n = 0
        pairs: set[tuple[str, str]] = set()
        for pid, enc in zip(pids, encs, strict=True):
            if enc is None:
                continue
            rec = PaymentRecord.decode(enc)
            for kind in VELOCITY_ENTITIES:
                key = rec.key(kind)
                if key is not None:
                    pipe.zrem(self._log[kind] + key, enc)
            pipe.delete(self._k("pay", pid))
            pipe.zrem(self._k("upay", rec.user_id), pid)
            for kind in ("card", "device", "ip"):
                key = rec.key(kind)
                if key is not None:
                    pipe.zrem(self._k("xpay", kind, key), pid)
            if rec.creator_id is not None:
                pipe.zrem(self._k("cpay", rec.creator_id), pid)
                pipe.zrem(self._pair(rec.creator_id, rec.user_id), pid)
                pairs.add((rec.creator_id, rec.user_id))
            if first_member is not None:
                pipe.zrem(self._k("first", rec.user_id), first_member)
            n += 1
        for creator, user in sorted(pairs):  # in the same transaction, after the removals
            self._fix(keys=[self._pair(creator, user), self._k("clast", creator)], args=[user], client=pipe)
        pipe.execute()
        return n

    def clear(self) -> None:
        batch: list[bytes] = []
        for k in self.client.scan_iter(match=f"{self.prefix}*", count=1000):
            batch.append(k)
            if len(batch) >= 1000:
                self.client.delete(*batch)
                batch = []
        if batch:
            self.client.delete(*batch)

    def close(self) -> None:
        for conn in list(self._conns):
            conn.disconnect()
        self._conns.clear()
        self._local = threading.local()
        self.client.close()


def _one_per_payment(records: list[PaymentRecord]) -> list[PaymentRecord]:
    """Keep one record per payment id (the earliest, then smallest encoding): deterministic."""
    seen: dict[str, PaymentRecord] = {}
    for r in sorted(records, key=lambda r: (r.ts, r.encode())):
        seen.setdefault(r.payment_id, r)
    return list(seen.values())


# --- the API's entry point ------------------------------------------------------------------------

Event = Payment | Dispute | User | Item | Creator


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def record_of(payment: Payment | dict[str, Any]) -> PaymentRecord:
    """The online record of a payment given as the event model or a plain mapping."""
    if isinstance(payment, Payment):
        return PaymentRecord.from_payment(payment)
    kind = str(_get(payment, "kind", PaymentKind.PURCHASE.value) or PaymentKind.PURCHASE.value)
    try:
        model = Payment.model_validate(
            {
                "payment_id": payment["payment_id"],
                "user_id": payment["user_id"],
                "item_ids": list(payment.get("item_ids") or []),
                "payment_time": payment["payment_time"],
                "kind": kind,
                "amount": payment["amount"],
                "currency": payment.get("currency") or "EUR",
                **{
                    k: payment.get(k)
                    for k in ("card_fingerprint", "card_bin_country", "billing_country", "device_id", "ip")
                },
                "ip_country": payment.get("ip_country"),
                "creator_id": payment.get("creator_id"),
            }
        )
    except (KeyError, ValueError) as exc:
        raise OnlineFeatureError(f"not a valid payment: {exc}") from None
    return PaymentRecord.from_payment(model)


class OnlineFeatures:
    """The online feature store of the fraud model: Feast profiles + the event state.

    One instance per process (thread-safe). ``OnlineFeatures(settings)`` opens the
    configured stores; tests pass ``store`` / ``state`` explicitly.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: FeatureStore | None = None,
        state: EventState | None = None,
    ) -> None:
        from features.feature_repo import PROFILE_VIEWS
        from features.settings import get_settings
        from features.store import open_event_state, open_feature_store

        self.settings = settings or get_settings()
        self.store = store if store is not None else open_feature_store(self.settings)
        self.state = state if state is not None else open_event_state(self.settings)
        self._views: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._profile_fields = {pv.name: tuple(pv.fields) for pv in PROFILE_VIEWS}
        self._redis_fields: dict[str, tuple[bytes, ...]] = {}
        cfg = self.store.config
        self._redis_project = cfg.project.encode() if cfg.online_store.type == "redis" else None
        self._key_heads: dict[str, bytes] = {}
        self._check_key_heads()
        if self.store.config.registry.enable_online_feature_view_versioning:
            raise OnlineFeatureError("online feature view versioning is not supported by the profile reads")
        if self.store.config.online_store.type == "sqlite":
            # Feast's SQLite store commits with a full fsync per write (~8 ms); WAL makes a
            # profile push cost what the event-state writes cost
            conn = self.store._get_provider().online_store._get_conn(self.store.config)  # type: ignore[attr-defined]
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")

    # -- profiles (Feast) --------------------------------------------------------------------
    def _view(self, name: str) -> Any:
        with self._lock:
            if name not in self._views:
                self._views[name] = self.store.get_feature_view(name)
            return self._views[name]

    def _read_profiles(self, view: str, join_key: str, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from feast.type_map import feast_value_type_to_python_type

        if not keys:
            return []
        fv = self._view(view)
        ek = [EntityKey(join_keys=[join_key], entity_values=[Value(string_val=k)]) for k in keys]
        provider = self.store._get_provider()
        rows = provider.online_read(config=self.store.config, table=fv, entity_keys=ek)
        out: list[dict[str, Any] | None] = []
        for _ts, values in rows:
            parsed = {k: feast_value_type_to_python_type(v) for k, v in (values or {}).items()}
            # Redis answers an unknown key with empty values, SQLite with nothing: both mean "no profile"
            out.append(parsed if any(v is not None for v in parsed.values()) else None)
        return out

    def _profile_query(self, view: str, join_key: str, keys: Sequence[str]) -> ProfileQuery:
        """How to read profile rows straight from Feast's online layout (see `ProfileQuery`)."""
        fields = self._profile_fields[view]
        if self._redis_project is not None:
            if view not in self._redis_fields:
                from feast.infra.online_stores.helpers import _mmh3

                self._redis_fields[view] = tuple(_mmh3(f"{view}:{f}") for f in fields)
            return ProfileQuery(
                view,
                fields,
                redis_keys=tuple(self._entity_key(join_key, k) + self._redis_project for k in keys),
                redis_fields=self._redis_fields[view],
            )
        return ProfileQuery(
            view,
            fields,
            sqlite_table=f"{self.store.config.project}_{view}",
            sqlite_keys=tuple(self._entity_key(join_key, k) for k in keys),
        )

    def _entity_key(self, join_key: str, value: str) -> bytes:
        """Feast's serialized entity key of one string join key, without building protobufs.

        Feast's v3 layout: key count, then per key its type, length and name, then per value
        its type, length and bytes. ``__init__`` checks this against Feast's own serializer and
        falls back to it if they differ (another serialization version, a changed layout).
        """
        raw = value.encode()
        head = self._key_heads.get(join_key)
        if head is not None:
            return head + _U32.pack(len(raw)) + raw
        return self._feast_entity_key(join_key, value)

    def _feast_entity_key(self, join_key: str, value: str) -> bytes:
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        ek = EntityKey(join_keys=[join_key], entity_values=[Value(string_val=value)])
        version = self.store.config.entity_key_serialization_version
        return serialize_entity_key(ek, entity_key_serialization_version=version)

    def _check_key_heads(self) -> None:
        """Use the fast entity-key encoding only where it gives Feast's bytes exactly."""
        from feast.protos.feast.types.Value_pb2 import ValueType

        string = _U32.pack(ValueType.STRING)
        for join_key in ("user_id", "item_id"):
            name = join_key.encode()
            head = _U32.pack(1) + string + _U32.pack(len(name)) + name + string
            self._key_heads[join_key] = head
            for probe in ("u1", "ü-\x1f-ключ", ""):
                if self._entity_key(join_key, probe) != self._feast_entity_key(join_key, probe):
                    del self._key_heads[join_key]
                    break

    def _write_profile(
        self, view: str, join_key: str, key: str, values: dict[str, Any], when: dt.datetime
    ) -> None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        def proto(v: Any) -> Value:
            if v is None:
                return Value()
            if isinstance(v, bool | int):
                return Value(int64_val=int(v))
            return Value(string_val=str(v))

        fv = self._view(view)
        row = (
            EntityKey(join_keys=[join_key], entity_values=[Value(string_val=key)]),
            {k: proto(v) for k, v in values.items()},
            _EPOCH + dt.timedelta(microseconds=to_us(when)),  # a plain UTC datetime (not a pandas subclass)
            None,
        )
        self.store._get_provider().online_write_batch(self.store.config, fv, [row], progress=None)

    # -- updates -----------------------------------------------------------------------------
    def update(self, event: Event) -> bool:
        """Apply one event to the online store; True if it changed anything.

        The one real-time update function: the API's event ingestion and its scoring path
        both call it. Idempotent and independent of arrival order.
        """
        if isinstance(event, Payment):
            if event.kind != PaymentKind.PURCHASE:
                return False
            batch = StateBatch()
            batch.add_payment(PaymentRecord.from_payment(event))
            self.state.write(batch)
            return True
        if isinstance(event, Dispute):
            routes = self.state.payment_routes([event.payment_id])
            if event.payment_id not in routes:
                return False
            batch = StateBatch()
            _route_dispute(batch, event.dispute_id, to_us(event.reported_time), routes[event.payment_id])
            self.state.write(batch)
            return True
        if isinstance(event, User):
            values = {
                "signup_ts": to_us(event.signup_time),
                "kyc_status": event.kyc_status.value,
                "country": event.country,
                "is_guest": int(event.is_guest),
            }
            self._write_profile("user_profile", "user_id", event.user_id, values, event.signup_time)
            return True
        if isinstance(event, Item):
            values = {"price_cents": to_cents(event.price), "created_ts": to_us(event.created_time)}
            self._write_profile("item_profile", "item_id", event.item_id, values, event.created_time)
            return True
        return False  # creators and other events carry nothing the fraud features use

    def update_payment(self, payment: Payment | dict[str, Any]) -> bool:
        """`update` for a payment given as a mapping (the API's request body)."""
        if _get(payment, "kind", "purchase") not in (None, "purchase", PaymentKind.PURCHASE):
            return False
        rec = record_of(payment)
        batch = StateBatch()
        batch.add_payment(rec)
        self.state.write(batch)
        return True

    def update_interactions(self, events: Sequence[Any]) -> None:
        """Interactions feed no fraud feature: they go to the recommender's per-person history
        (Feast view ``recommender_user_history``, see `features.rec_feast`)."""
        from features.rec_feast import history_store

        history_store(self.store).append(events)

    # -- reads -------------------------------------------------------------------------------
    def payment_vector(
        self, payment: Payment | dict[str, Any], names: Sequence[str] | None = None
    ) -> dict[str, float]:
        """The feature vector of a payment being scored (it is included whether stored or not).

        Missing values are NaN, exactly as in `payment_feature_frame`. ``names`` selects and
        orders the columns of one model.
        """
        rec = record_of(payment)
        queries = self._payment_queries(rec)
        snap = self.state.snapshot(rec, queries)  # one round trip: state and Feast profiles
        return self._vector(rec, snap, names)

    def payment_vectors_and_update(
        self, payments: Sequence[PaymentRecord], names: Sequence[Sequence[str] | None]
    ) -> list[dict[str, float]]:
        """What scoring purchases does, for each in order: its vector (as `payment_vector`), then
        the payment applied to the real-time state (as `update_payment`). One round trip on Redis
        however many payments; a later payment of the list sees the earlier ones, exactly as if
        they had been scored one after the other."""
        items = []
        for rec in payments:
            batch = StateBatch()
            batch.add_payment(rec)
            items.append((rec, self._payment_queries(rec), batch))
        snaps = self.state.snapshot_and_write(items)
        return [self._vector(rec, snap, n) for rec, snap, n in zip(payments, snaps, names, strict=True)]

    def _payment_queries(self, rec: PaymentRecord) -> list[ProfileQuery]:
        queries = [self._profile_query("user_profile", "user_id", [rec.user_id])]
        if rec.item_ids:
            queries.append(self._profile_query("item_profile", "item_id", list(rec.item_ids)))
        return queries

    def _vector(self, rec: PaymentRecord, snap: Snapshot, names: Sequence[str] | None) -> dict[str, float]:
        snap.user_profile = snap.profiles[0][0]
        if rec.item_ids:
            snap.items = [
                (int(i["price_cents"]), int(i["created_ts"]))
                for i in snap.profiles[1]
                if i is not None and i.get("price_cents") is not None and i.get("created_ts") is not None
            ]
        vec = compute_payment_vector(rec, snap)
        if names is None:
            return vec
        try:
            return {n: vec[n] for n in names}
        except KeyError as exc:
            raise OnlineFeatureError(f"unknown payment feature {exc}") from None

    def request_vector(self, payment: Payment | dict[str, Any]) -> dict[str, float]:
        """Features of the request alone (no store access): the degraded tier's inputs."""
        rec = record_of(payment)
        full = compute_payment_vector(rec, Snapshot())
        from features.payment_features import REQUEST_FEATURES

        return {n: full[n] for n in REQUEST_FEATURES}

    def delete(self, entity: str, keys: Sequence[str]) -> int:
        return delete_entities(self, entity, keys)

    def close(self) -> None:
        self.state.close()


def _route_dispute(
    batch: StateBatch, dispute_id: str, reported: int, route: tuple[str, str | None, str | None]
) -> None:
    user, card, creator = route
    batch.disputes.append(("user", user, dispute_id, reported))
    if card is not None:
        batch.disputes.append(("card", card, dispute_id, reported))
    if creator is not None:
        batch.disputes.append(("creator", creator, dispute_id, reported))


def update_online(online: OnlineFeatures, event: Event) -> bool:
    """The one real-time update function (API event ingestion and scoring both call it)."""
    return online.update(event)


def online_payment_vector(
    online: OnlineFeatures, payment: Payment | dict[str, Any], names: Sequence[str] | None = None
) -> dict[str, float]:
    """The online feature vector of a payment being scored (equal to the offline row within 1e-9)."""
    return online.payment_vector(payment, names)


def score_online(
    online: OnlineFeatures, payment: Payment | dict[str, Any], names: Sequence[str] | None = None
) -> dict[str, float]:
    """The API's scoring path for one payment: its online vector, and the payment applied."""
    return score_online_many(online, [record_of(payment)], [names])[0]


def score_online_many(
    online: OnlineFeatures, records: Sequence[PaymentRecord], names: Sequence[Sequence[str] | None]
) -> list[dict[str, float]]:
    """The API's scoring path for a batch of requests (`record_of` each payment first): vectors,
    and the payments applied in order (see `OnlineFeatures.payment_vectors_and_update`)."""
    return online.payment_vectors_and_update(records, names)


def delete_entities(online: OnlineFeatures, entity_name: str, keys: Iterable[str]) -> int:
    """Erase every online value keyed by ``entity_name`` (Feast views and the event state).

    One call of `features.privacy.erasure.erase_online_entities`, the same function the
    right-to-erasure path uses. Returns the number of records removed.
    """
    from features.feature_repo import ENTITY_JOIN_KEYS
    from features.privacy.erasure import FeastOnline, erase_online_entities

    if entity_name not in ERASABLE:
        raise OnlineFeatureError(f"cannot erase entity {entity_name!r}; known: {ERASABLE}")
    targets = {ENTITY_JOIN_KEYS[entity_name]: [str(k) for k in keys]}
    counts = erase_online_entities(targets, feast=FeastOnline.from_store(online.store), state=online.state)
    return sum(counts.values())


def load_state(
    online: OnlineFeatures,
    events_dir: Path,
    *,
    chunk: int = 50_000,
    on_progress: Any = None,
    until: dt.datetime | None = None,
) -> dict[str, int]:
    """Fill the event state from the event tables (after a build; idempotent).

    Every purchase goes into the payment index (disputes and erasure need it); the
    per-entity logs receive the payments of the last `RETENTION_US` before the newest one
    (older ones would be pruned anyway); first-seen times are the minima over all history.
    Rows are encoded by DuckDB and written in batches: no Python loop over single events.
    ``until`` keeps only payments before it and disputes reported before it: the state a
    live system had at that time (the benchmark replays the rest as live traffic).
    """
    import duckdb

    from features.storage import table_path

    pay = str(table_path(events_dir, "payments")).replace("'", "''")
    con = duckdb.connect()
    sep = "chr(31)"
    cutoff = to_us(until) if until is not None else 2**62
    enc = (
        f"concat(epoch_us(payment_time), {sep}, payment_id, {sep}, floor(amount * 100 + 0.5)::BIGINT, {sep}, "
        f"user_id, {sep}, coalesce(card_fingerprint, ''), {sep}, coalesce(device_id, ''), {sep}, "
        f"coalesce(ip, ''), {sep}, coalesce(ip_country, ''), {sep}, coalesce(creator_id, ''))"
    )
    con.execute(f"""
        CREATE TEMP TABLE p AS SELECT payment_id, epoch_us(payment_time) AS ts, user_id, card_fingerprint AS card,
          device_id AS device, ip, ip_country, creator_id, {enc} AS rec
        FROM read_parquet('{pay}') WHERE kind = 'purchase' AND epoch_us(payment_time) < {cutoff}
    """)
    newest = con.execute("SELECT max(ts) FROM p").fetchone()
    horizon = (newest[0] if newest and newest[0] is not None else 0) - RETENTION_US
    counts = {"payments": 0, "log_records": 0, "first_seen": 0, "disputes": 0}

    def batches(sql: str) -> Iterable[list[tuple[Any, ...]]]:
        cur = con.execute(sql)
        while rows := cur.fetchmany(chunk):
            yield rows

    for rows in batches("SELECT payment_id, ts, user_id, card, device, ip, creator_id, rec FROM p"):
        online.state.write(StateBatch(payments=list(rows)))
        counts["payments"] += len(rows)
        if on_progress:
            on_progress("payment index", counts["payments"])
    logs = " UNION ALL ".join(
        f"SELECT '{k}', {c}, ts, payment_id, rec FROM p WHERE {c} IS NOT NULL AND ts > {horizon}"
        for k, c in (
            ("user", "user_id"),
            ("card", "card"),
            ("device", "device"),
            ("ip", "ip"),
        )
    )
    for rows in batches(logs):
        online.state.write(StateBatch(logs=list(rows)))
        counts["log_records"] += len(rows)
        if on_progress:
            on_progress("entity logs", counts["log_records"])
    firsts = " UNION ALL ".join(
        f"SELECT user_id, '{w}', {c}, min(ts) FROM p WHERE {c} IS NOT NULL GROUP BY user_id, {c}"
        for w, c in (("card", "card"), ("device", "device"), ("country", "ip_country"))
    )
    for rows in batches(firsts):
        online.state.write(StateBatch(first_seen=list(rows)))
        counts["first_seen"] += len(rows)
    if table_path(events_dir, "disputes").exists():
        dsp = str(table_path(events_dir, "disputes")).replace("'", "''")
        routed = " UNION ALL ".join(
            f"SELECT '{k}', p.{c}, d.dispute_id, epoch_us(d.reported_time) FROM read_parquet('{dsp}') d "
            f"JOIN p USING (payment_id) WHERE p.{c} IS NOT NULL AND epoch_us(d.reported_time) < {cutoff}"
            for k, c in (("user", "user_id"), ("card", "card"), ("creator", "creator_id"))
        )
        for rows in batches(routed):
            online.state.write(StateBatch(disputes=list(rows)))
            counts["disputes"] += len(rows)
    con.close()
    return counts
