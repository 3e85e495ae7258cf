"""The models the API serves, loaded once from the MLflow registry and swapped atomically.

A `ModelSet` is immutable: a request takes the current set once and uses it to the end, so a
reload (``aipic models reload``, ``POST /v1/admin/models/reload`` or the poller) never changes a
model under a request in flight. A reload loads every changed champion first and swaps the
reference only when all of them loaded; a failed load keeps the old set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from models.bundle import ModelBundle

log = logging.getLogger("aipic.serving.models")

FRAUD_TIERS: tuple[str, ...] = ("full", "no_device_location", "request_only")
REC_TIERS: tuple[str, ...] = ("personalized", "limited")
FRAUD_DEGRADED_TIER = "request_only"


def fraud_name(tier: str) -> str:
    return f"fraud-{tier}"


def rec_name(tier: str) -> str:
    return f"recommender-{tier}"


DEFAULT_MODELS: tuple[str, ...] = tuple(fraud_name(t) for t in FRAUD_TIERS) + tuple(
    rec_name(t) for t in REC_TIERS
)

Loader = Callable[..., ModelBundle]
VersionOf = Callable[[str], "str | None"]


class ModelUnavailable(LookupError):
    """The model a request needs is not loaded (not registered yet, or failed to load)."""


@dataclass(frozen=True)
class ModelSet:
    """Loaded bundles by registered name, plus when they were loaded."""

    bundles: Mapping[str, ModelBundle]
    loaded_at: float = field(default_factory=time.time)

    def get(self, name: str) -> ModelBundle:
        bundle = self.bundles.get(name)
        if bundle is None:
            raise ModelUnavailable(f"model {name} is not loaded: train and promote it, then reload")
        return bundle

    def has(self, name: str) -> bool:
        return name in self.bundles

    def versions(self) -> dict[str, tuple[str, str]]:
        return {n: (b.version, hash_of(b)) for n, b in self.bundles.items()}


_HASHES: dict[int, tuple[ModelBundle, str]] = {}


def hash_of(bundle: ModelBundle) -> str:
    """`bundle.model_hash`, computed once per loaded bundle (it hashes the whole model text)."""
    hit = _HASHES.get(id(bundle))
    if hit is not None and hit[0] is bundle:
        return hit[1]
    digest = bundle.model_hash
    if len(_HASHES) > 64:
        _HASHES.clear()
    _HASHES[id(bundle)] = (bundle, digest)
    return digest


def warm_up(bundle: ModelBundle) -> None:
    """One prediction and one TreeSHAP pass so the first real request does not pay for them."""
    x = np.zeros((1, len(bundle.feature_names)), dtype=np.float64)
    bundle.raw_score(x)
    bundle.contributions(x)
    hash_of(bundle)


class ModelManager:
    """Holds the current ModelSet; reloads it from the registry when a champion changes."""

    def __init__(
        self,
        names: Iterable[str] = DEFAULT_MODELS,
        loader: Loader | None = None,
        version_of: VersionOf | None = None,
        history_size: int = 16,
    ) -> None:
        self.names = tuple(names)
        self._loader = loader
        self._version_of = version_of
        self._current = ModelSet(MappingProxyType({}))
        self._lock = threading.Lock()
        self._history: OrderedDict[tuple[str, str], ModelBundle] = OrderedDict()
        self._history_size = history_size
        self.last_error: str | None = None

    # registry access (imported lazily: MLflow is heavy) ------------------------------------------
    def _load(self, name: str, version: str | None = None) -> ModelBundle:
        if self._loader is not None:
            return self._loader(name, version=version)
        from training.registry import load_bundle

        return load_bundle(name, version=version)

    def _champion(self, name: str) -> str | None:
        if self._version_of is not None:
            return self._version_of(name)
        from training.registry import champion_version

        return champion_version(name)

    # state ------------------------------------------------------------------------------------
    @property
    def current(self) -> ModelSet:
        return self._current

    @property
    def complete(self) -> bool:
        return all(self._current.has(n) for n in self.names)

    def missing(self) -> list[str]:
        return [n for n in self.names if not self._current.has(n)]

    def reload(self, force: bool = False) -> dict[str, str]:
        """Load every champion whose version changed; swap atomically. Returns what changed.

        A model that is not registered is skipped (and stays missing); a model that fails to load
        aborts the swap so the old set keeps serving.
        """
        with self._lock:
            old = self._current
            wanted: dict[str, str] = {}
            for name in self.names:
                version = self._champion(name)
                if version is not None:
                    wanted[name] = version
            changed = {
                n: v for n, v in wanted.items() if force or not old.has(n) or old.bundles[n].version != v
            }
            if not changed:
                return {}
            fresh: dict[str, ModelBundle] = {}
            for name, version in changed.items():
                try:
                    bundle = self._load(name, version=version)
                    warm_up(bundle)
                except Exception as exc:
                    self.last_error = f"{name} v{version}: {type(exc).__name__}: {exc}"
                    log.error("model load failed, keeping the current set: %s", self.last_error)
                    raise
                fresh[name] = bundle
                self._remember(bundle)
            merged = {n: b for n, b in old.bundles.items() if n in wanted or n not in self.names}
            merged.update(fresh)
            self._current = ModelSet(MappingProxyType(merged))
            self.last_error = None
            log.info("models loaded: %s", ", ".join(f"{n} v{b.version}" for n, b in sorted(fresh.items())))
            return {n: b.version for n, b in fresh.items()}

    def install(self, bundles: Iterable[ModelBundle]) -> None:
        """Serve these bundles directly (tests, benchmarks without a registry)."""
        with self._lock:
            merged = dict(self._current.bundles)
            for b in bundles:
                warm_up(b)
                merged[b.name] = b
                self._remember(b)
            self._current = ModelSet(MappingProxyType(merged))

    def version(self, name: str, version: str) -> ModelBundle:
        """A specific registered version (the one a logged decision used), cached."""
        current = self._current.bundles.get(name)
        if current is not None and current.version == version:
            return current
        key = (name, version)
        with self._lock:
            hit = self._history.get(key)
            if hit is not None:
                self._history.move_to_end(key)
                return hit
        try:
            bundle = self._load(name, version=version)
        except Exception as exc:
            raise ModelUnavailable(f"{name} version {version} cannot be loaded: {exc}") from exc
        with self._lock:
            self._remember(bundle)
        return bundle

    def _remember(self, bundle: ModelBundle) -> None:
        self._history[(bundle.name, bundle.version)] = bundle
        self._history.move_to_end((bundle.name, bundle.version))
        while len(self._history) > self._history_size:
            self._history.popitem(last=False)
