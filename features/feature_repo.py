"""The Feast feature repo, generated from the FeatureDef lists (never written by hand).

Every pipeline declares one `FeatureSet` (its model, its FeatureDefs, its tiers) in a
module listed in `FEATURE_SET_MODULES`. From all of them this module generates:

* one Entity per entity name (join keys in `ENTITY_JOIN_KEYS`),
* one FileSource + FeatureView per (model, entity): ``<model>_<entity>`` over the parquet
  table ``<offline_dir>/<model>_<entity>.parquet`` (join key, ``event_timestamp``, features),
* one on-demand feature view ``<model>_request`` for features of entity ``request``,
  computed by the set's vectorised ``request_fn`` from a RequestSource, and one
  ``<model>_<name>`` per `OnDemand` group (features of its entities computed at request time
  from a RequestSource and the set's raw views),
* the set's raw views (``raw_views``): stored inputs of on-demand features that are not
  model inputs themselves (the recommender's per-person history), in no FeatureService,
* one FeatureService ``<model>_<tier>`` per tier, holding exactly the tier's features,
* the profile views (`PROFILE_VIEWS`) the online path reads: user and item attributes.

`feature_services()` answers "which features does each service hold" without Feast, for
the privacy registry; `feast_objects()` builds the Feast objects themselves.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from features.definitions import FeatureDef

if TYPE_CHECKING:
    import pandas as pd
    from feast import Entity, FeatureService, FeatureView, OnDemandFeatureView

#: Modules defining a module-level ``FEATURE_SET``: add one line per pipeline.
FEATURE_SET_MODULES: tuple[str, ...] = ("features.payment_features", "features.rec_feast")

#: Entity name -> join key (the column of the event tables that identifies it).
ENTITY_JOIN_KEYS: dict[str, str] = {
    "user": "user_id",
    "card": "card_fingerprint",
    "device": "device_id",
    "ip": "ip",
    "creator": "creator_id",
    "item": "item_id",
    "payment": "payment_id",
}
REQUEST = "request"
TIMESTAMP = "event_timestamp"
#: Entities whose rows are one-shot (a payment is scored once): offline only, never materialised.
OFFLINE_ONLY_ENTITIES = frozenset({"payment"})

_FEAST_TYPES = {"float64": "Float64", "int64": "Int64", "string": "String"}


@dataclass(frozen=True)
class OnDemand:
    """Features of some entities computed at request time (one Feast on-demand view).

    ``fn`` is vectorised (a frame of request rows in, one column per feature out) and reads
    the ``inputs`` (request-time columns -> Feast type) and the fields of the raw views named
    in ``sources``.
    """

    name: str
    entities: frozenset[str]
    inputs: Mapping[str, str]
    fn: Callable[[pd.DataFrame], pd.DataFrame]
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeatureSet:
    """The inputs of one model family and its tiers (one FeatureService per tier)."""

    model: str
    features: tuple[FeatureDef, ...]
    tiers: Mapping[str, Callable[[FeatureDef], bool]]
    #: request-time inputs (column -> Feast type) and the vectorised function computing the
    #: ``request`` features from them; both needed only if some feature has entity "request".
    request_inputs: Mapping[str, str] = field(default_factory=dict)
    request_fn: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    #: ``build_offline(events_dir, offline_dir, on_step)`` writes the set's offline tables
    #: (``<offline_dir>/<model>_<entity>.parquet``) and returns a JSON-able summary.
    build_offline: Callable[[Path, Path, Callable[[str, int, int], None] | None], dict[str, Any]] | None = (
        None
    )
    #: groups of features computed at request time (besides ``request``, see `on_demand_groups`)
    on_demand: tuple[OnDemand, ...] = ()
    #: stored inputs of on-demand groups that are not model inputs (named ``<model>_...``)
    raw_views: tuple[ProfileView, ...] = ()

    def tier_features(self, tier: str) -> list[FeatureDef]:
        try:
            keep = self.tiers[tier]
        except KeyError:
            raise KeyError(f"{self.model}: unknown tier {tier!r}; known {sorted(self.tiers)}") from None
        return [f for f in self.features if keep(f)]

    def on_demand_groups(self) -> list[OnDemand]:
        """Every on-demand group; ``request_fn`` makes the default ``request`` group."""
        groups = list(self.on_demand)
        if self.request_fn is not None and not any(REQUEST in g.entities for g in groups):
            groups.append(OnDemand(REQUEST, frozenset({REQUEST}), self.request_inputs, self.request_fn))
        return groups

    def computed_entities(self) -> frozenset[str]:
        """Entities whose features are computed at request time, never stored."""
        return frozenset({REQUEST}).union(*(g.entities for g in self.on_demand))

    def entities(self) -> list[str]:
        """Entities with a stored view of model inputs."""
        return sorted({f.entity for f in self.features} - self.computed_entities())

    def view_name(self, entity: str) -> str:
        return f"{self.model}_{REQUEST if entity == REQUEST else entity}"

    def service_name(self, tier: str) -> str:
        return f"{self.model}_{tier}"


@dataclass(frozen=True)
class ProfileView:
    """Raw attributes read online (not model inputs): user and item profiles."""

    name: str
    entity: str
    fields: Mapping[str, str]  # name -> Feast type


PROFILE_VIEWS: tuple[ProfileView, ...] = (
    ProfileView(
        "user_profile",
        "user",
        {"signup_ts": "Int64", "kyc_status": "String", "country": "String", "is_guest": "Int64"},
    ),
    ProfileView("item_profile", "item", {"price_cents": "Int64", "created_ts": "Int64"}),
)


def feature_sets() -> list[FeatureSet]:
    """Every registered FeatureSet, in `FEATURE_SET_MODULES` order."""
    out: list[FeatureSet] = []
    for mod_name in FEATURE_SET_MODULES:
        mod = importlib.import_module(mod_name)
        fs = getattr(mod, "FEATURE_SET", None)
        if not isinstance(fs, FeatureSet):
            raise TypeError(f"{mod_name} must define FEATURE_SET: FeatureSet")
        out.append(fs)
    models = [s.model for s in out]
    if len(set(models)) != len(models):
        raise ValueError(f"duplicate models in feature sets: {models}")
    return out


def all_feature_defs() -> list[FeatureDef]:
    """Every model input of every registered pipeline."""
    return [f for s in feature_sets() for f in s.features]


def feature_services(sets: list[FeatureSet] | None = None) -> dict[str, list[str]]:
    """FeatureService name -> the feature names it holds (no Feast import)."""
    return {
        s.service_name(t): [f.name for f in s.tier_features(t)]
        for s in sets or feature_sets()
        for t in s.tiers
    }


def offline_table_path(offline_dir: Path, view_name: str) -> Path:
    return Path(offline_dir) / f"{view_name}.parquet"


@dataclass
class FeastObjects:
    """Everything `FeatureStore.apply` needs, plus lookups by name."""

    entities: dict[str, Entity]
    feature_views: dict[str, FeatureView]
    on_demand_views: dict[str, OnDemandFeatureView]
    services: dict[str, FeatureService]

    def all(self) -> list[Any]:
        return [
            *self.entities.values(),
            *self.feature_views.values(),
            *self.on_demand_views.values(),
            *self.services.values(),
        ]


def _feast_type(name: str) -> Any:
    """``Float64`` or ``Array(String)`` -> the Feast type."""
    from feast import types

    if name.startswith("Array(") and name.endswith(")"):
        return types.Array(getattr(types, name[6:-1]))
    return getattr(types, name)


def _detached(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn``: Feast's decorator rewrites ``__module__`` of what it is given to
    ``__main__`` (for dill), which would break the next generation from the same function."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__module__ = fn.__module__
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    copy.__annotations__ = dict(fn.__annotations__)
    return copy


def feast_objects(offline_dir: Path, sets: list[FeatureSet] | None = None) -> FeastObjects:
    """Generate entities, sources, views, on-demand views and services from the FeatureSets."""
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, RequestSource, ValueType
    from feast.on_demand_feature_view import on_demand_feature_view

    sets = sets if sets is not None else feature_sets()
    used = (
        {e for s in sets for e in s.entities()}
        | {p.entity for p in PROFILE_VIEWS}
        | {rv.entity for s in sets for rv in s.raw_views}
    )
    unknown = used - set(ENTITY_JOIN_KEYS)
    if unknown:
        raise ValueError(f"entities without a join key: {sorted(unknown)}; add them to ENTITY_JOIN_KEYS")
    entities = {
        e: Entity(name=e, join_keys=[ENTITY_JOIN_KEYS[e]], value_type=ValueType.STRING) for e in sorted(used)
    }

    def view(name: str, entity: str, fields: list[tuple[str, str]], description: str) -> FeatureView:
        source = FileSource(
            name=f"{name}_source",
            path=str(offline_table_path(offline_dir, name).resolve()),
            timestamp_field=TIMESTAMP,
        )
        return FeatureView(
            name=name,
            entities=[entities[entity]],
            schema=[Field(name=n, dtype=_feast_type(t)) for n, t in fields],
            source=source,
            ttl=timedelta(0),  # no expiry: windows are already part of each feature's definition
            online=entity not in OFFLINE_ONLY_ENTITIES,
            description=description,
        )

    views: dict[str, FeatureView] = {}
    odfvs: dict[str, OnDemandFeatureView] = {}
    services: dict[str, FeatureService] = {}
    for pv in PROFILE_VIEWS:
        views[pv.name] = view(
            pv.name, pv.entity, list(pv.fields.items()), "Raw profile read by the online path."
        )
    for s in sets:
        for rv in s.raw_views:
            if not rv.name.startswith(f"{s.model}_"):
                raise ValueError(f"{s.model}: raw view {rv.name!r} must be named {s.model}_...")
            views[rv.name] = view(
                rv.name, rv.entity, list(rv.fields.items()), f"{s.model}: stored inputs of on-demand features"
            )
        for ent in s.entities():
            defs = [f for f in s.features if f.entity == ent]
            fields = [(f.name, _FEAST_TYPES[f.dtype]) for f in defs]
            views[s.view_name(ent)] = view(s.view_name(ent), ent, fields, f"{s.model} features of each {ent}")
        groups = s.on_demand_groups()
        orphans = [
            f.name
            for f in s.features
            if f.entity in s.computed_entities() and not any(f.entity in g.entities for g in groups)
        ]
        if orphans:
            raise ValueError(f"{s.model}: no on-demand computation for {orphans} (request_fn or on_demand)")
        for group in groups:
            defs = [f for f in s.features if f.entity in group.entities]
            if not defs:
                continue
            if not group.inputs:
                raise ValueError(f"{s.model}: on-demand features {group.name!r} need request inputs")
            name = f"{s.model}_{group.name}"
            rs = RequestSource(
                name=f"{name}_inputs",
                schema=[Field(name=n, dtype=_feast_type(t)) for n, t in group.inputs.items()],
            )
            decorate = on_demand_feature_view(
                name=name,
                sources=[*(views[v] for v in group.sources), rs],
                schema=[Field(name=f.name, dtype=_feast_type(_FEAST_TYPES[f.dtype])) for f in defs],
                mode="pandas",
                description=f"{s.model} features computed at request time ({', '.join(sorted(group.entities))})",
            )
            odfvs[name] = decorate(_detached(group.fn))
        for tier in s.tiers:
            names = {f.name for f in s.tier_features(tier)}
            parts: list[Any] = []
            for vname, v in [*views.items(), *odfvs.items()]:
                if not vname.startswith(f"{s.model}_"):
                    continue
                chosen = [f.name for f in v.features if f.name in names]
                if chosen:
                    parts.append(v[chosen])
            services[s.service_name(tier)] = FeatureService(
                name=s.service_name(tier),
                features=parts,
                description=f"{s.model} model inputs, tier {tier}",
                tags={"model": s.model, "tier": tier},
            )
    return FeastObjects(entities, views, odfvs, services)


def write_offline_tables(frame: pd.DataFrame, feature_set: FeatureSet, offline_dir: Path) -> dict[str, int]:
    """Split a per-event feature frame into one parquet table per (model, entity) view.

    ``frame`` needs the join key of every entity, the feature columns and a ``event_time``
    source column named by ``frame.attrs['time_column']`` (default ``payment_time``). Rows
    whose join key is null are dropped (that entity does not exist for them).
    """
    import pandas as pd

    offline_dir.mkdir(parents=True, exist_ok=True)
    time_col = frame.attrs.get("time_column", "payment_time")
    rows: dict[str, int] = {}
    for ent in feature_set.entities():
        key = ENTITY_JOIN_KEYS[ent]
        cols = [f.name for f in feature_set.features if f.entity == ent]
        part = frame.loc[frame[key].notna(), [key, time_col, *cols]].rename(columns={time_col: TIMESTAMP})
        part[TIMESTAMP] = pd.to_datetime(part[TIMESTAMP], utc=True)
        path = offline_table_path(offline_dir, feature_set.view_name(ent))
        tmp = path.with_suffix(".parquet.tmp")
        part.to_parquet(tmp, index=False)
        tmp.replace(path)
        rows[feature_set.view_name(ent)] = len(part)
    return rows
