"""Train, evaluate and register the recommender's rankers per tier through MLflow.

The marketplace sells one-off digital pictures, so relevance is "bought next and not bought
before". Training windows come before the held-out window; the held-out window compares the
ranker with plain popularity (the personalised tier) and the limited tier with popularity too:
it must beat it using the request's context alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lightgbm as lgb
import mlflow
import numpy as np
import pandas as pd

from features.events import ConsentPurpose
from features.privacy.pit_consent import consent_valid_at
from features.privacy.registry import allowed_features, get_registry
from features.rec_features import REC_FEATURES, RecEvents, Tier, build_state
from features.settings import get_settings
from features.storage import read_table, table_path
from models.baselines import Interactions, most_popular
from models.bundle import ModelBundle
from models.ranker import LambdaRanker
from models.rec_metrics import ranking_metrics
from models.recommend import BusinessRules, rank_batch, training_set
from training import registry

EXPERIMENT = "recommender"
PURPOSE = "personalised_recommendations"
K = 10


class RecTrainingError(ValueError):
    """The events cannot train a recommender (too short, no purchases in a window, ...)."""


def rec_tiers() -> list[str]:
    return [t.name for t in get_registry().purpose(PURPOSE).tiers]


def model_name(tier: str) -> str:
    return f"recommender-{tier}"


def tier_feature_names(tier: str) -> list[str]:
    """The tier's inputs as the privacy registry derives them (the one source of truth)."""
    return [f.name for f in allowed_features(PURPOSE, tier, REC_FEATURES)]


@dataclass(frozen=True)
class RecWindows:
    train: list[tuple[pd.Timestamp, pd.Timestamp]]
    valid: tuple[pd.Timestamp, pd.Timestamp]
    test: tuple[pd.Timestamp, pd.Timestamp]

    def as_params(self) -> dict[str, str]:
        fmt = "%Y-%m-%d %H:%M"
        out = {f"train_window_{i}": f"{a:{fmt}} .. {b:{fmt}}" for i, (a, b) in enumerate(self.train)}
        out["valid_window"] = f"{self.valid[0]:{fmt}} .. {self.valid[1]:{fmt}}"
        out["test_window"] = f"{self.test[0]:{fmt}} .. {self.test[1]:{fmt}}"
        return out


def windows(events: RecEvents, label_days: int, n_train: int) -> RecWindows:
    """Consecutive label windows ending at the last event: n_train, then valid, then test."""
    end = pd.to_datetime(events.interactions["event_time"], utc=True).max()
    step = pd.Timedelta(days=label_days)
    edges = [end - step * i for i in range(n_train + 2, -1, -1)]
    pairs = list(itertools.pairwise(edges))
    return RecWindows(train=pairs[:n_train], valid=pairs[n_train], test=pairs[n_train + 1])


def consenting_users(events_dir: Path, users: pd.Index, at: pd.Timestamp) -> list[str]:
    """People whose personalisation consent was valid at ``at`` (point-in-time consent)."""
    if not table_path(events_dir, "consent_events").exists():
        return []
    consent = read_table(events_dir, "consent_events")
    ids = np.asarray(users, dtype=object)
    ok = consent_valid_at(consent, ids, pd.DatetimeIndex([at] * len(ids)), ConsentPurpose.PERSONALISATION)
    return [str(u) for u in ids[ok]]


def held_out(events: RecEvents, win: RecWindows) -> tuple[list[str], pd.DataFrame]:
    """Buyers of the test window and the items they bought there that they had not bought before."""
    inter = events.interactions
    t = pd.to_datetime(inter["event_time"], utc=True)
    buys = inter[inter["event_type"].astype(str) == "purchase"]
    tb = t[buys.index]
    before = buys[tb < win.test[0]][["user_id", "item_id"]].drop_duplicates()
    during = buys[(tb >= win.test[0]) & (tb < win.test[1])][["user_id", "item_id"]].drop_duplicates()
    new = during.merge(before, how="left", indicator=True)
    new = new[new["_merge"] == "left_only"].drop(columns="_merge")
    return sorted(new["user_id"].astype(str).unique()), new.rename(
        columns={"user_id": "user", "item_id": "item"}
    )


def evaluate(
    events: RecEvents, ranker: LambdaRanker, tier: str, win: RecWindows, users: list[str]
) -> dict[str, float]:
    """nDCG@10 and recall@10 of the ranker and of popularity on the held-out window."""
    _, relevant = held_out(events, win)
    relevant = relevant[relevant["user"].isin(users)]
    state = build_state(events, win.test[0])
    catalogue = int(state.item_active.sum())
    rules = BusinessRules(allow_repeats=False, max_per_creator=None)
    context = None
    if tier == "limited":
        context = _last_item_before(events, users, win.test[0])
    recs = rank_batch(
        state, ranker, users, tier=cast(Tier, tier), rules=rules, k=K, context_ids=context
    ).rename(columns={"user_id": "user", "item_id": "item"})
    inter = events.interactions
    t = pd.to_datetime(inter["event_time"], utc=True)
    past = inter[(t < win.test[0]) & (inter["event_type"].astype(str) == "purchase")]
    popular = most_popular(
        Interactions.from_purchases(past),
        users,
        k=K,
        exclude_bought=True,
    )
    ours = ranking_metrics(recs, relevant, K, catalogue)
    base = ranking_metrics(popular, relevant, K, catalogue)
    return {
        f"ndcg_at_{K}": ours["ndcg"],
        f"recall_at_{K}": ours["recall"],
        "coverage": ours.get("coverage", float("nan")),
        f"ndcg_at_{K}_popularity": base["ndcg"],
        f"recall_at_{K}_popularity": base["recall"],
        "test_users": float(len(users)),
    }


def _last_item_before(events: RecEvents, users: list[str], at: pd.Timestamp) -> list[str | None]:
    """The picture each person looked at last before ``at``: the request context of the limited tier."""
    inter = events.interactions
    t = pd.to_datetime(inter["event_time"], utc=True)
    last = inter[t < at].assign(_t=t[t < at]).sort_values("_t").groupby("user_id")["item_id"].last()
    return [last.get(u) for u in users]


def train_tier(
    events: RecEvents, events_dir: Path, tier: str, win: RecWindows, say: Callable[[str], None]
) -> dict[str, Any]:
    names = tier_feature_names(tier)
    rules = BusinessRules(allow_repeats=False, max_per_creator=None)
    sets = []
    for cutoff, label_end in [*win.train, win.valid]:
        users = None
        if tier == "personalized":
            known = build_state(events, cutoff).users
            users = consenting_users(events_dir, known, cutoff)
        say(f"{model_name(tier)}: training set as of {cutoff:%Y-%m-%d}")
        sets.append(
            training_set(
                events,
                cutoff,
                label_end,
                tier=cast(Tier, tier),
                rules=rules,
                users=users,
                with_context=tier == "limited",
            )
        )
    train, valid = sets[:-1], sets[-1]
    if any(len(s.group) == 0 for s in sets):
        raise RecTrainingError(
            "a training window has no purchases to learn from: simulate more days or users"
        )
    if train[0].feature_names != names:
        raise RecTrainingError(f"ranker inputs {train[0].feature_names} differ from the registry's {names}")
    ranker = LambdaRanker(n_estimators=300, random_state=7)
    ranker.fit(
        np.vstack([s.X for s in train]),
        np.concatenate([s.y for s in train]),
        np.concatenate([s.group for s in train]),
        feature_names=names,
        eval_set=(valid.X, valid.y, valid.group),
    )
    test_users, _ = held_out(events, win)
    if tier == "personalized":
        test_users = sorted(
            set(test_users) & set(consenting_users(events_dir, pd.Index(test_users), win.test[0]))
        )
    metrics = evaluate(events, ranker, tier, win, test_users)
    legal = get_registry().legal_purpose(PURPOSE, tier).name
    booster = lgb.Booster(model_str=ranker.booster_.model_to_string(num_iteration=ranker.best_iteration_))
    bundle = ModelBundle(
        name=model_name(tier),
        purpose=legal,
        tier=tier,
        feature_names=names,
        booster=booster,
        extra={"policy_version": get_settings().policy_version, "objective": "lambdarank"},
    )
    with mlflow.start_run(run_name=model_name(tier), nested=mlflow.active_run() is not None) as run:
        mlflow.log_params(
            {
                "tier": tier,
                "purpose": legal,
                "n_features": len(names),
                "trees": ranker.best_iteration_,
                "train_groups": int(sum(len(s.group) for s in train)),
                **win.as_params(),
            }
        )
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        mlflow.log_dict(
            {
                f.name: {"categories": list(f.categories), "source": f.source}
                for f in REC_FEATURES
                if f.name in names
            },
            "features.json",
        )
        from training.plots import importance

        mlflow.log_figure(importance(ranker.feature_importance()), "plots/feature_importance.png")
        version = registry.log_bundle(bundle, pd.DataFrame(train[0].X[:50], columns=names))
        champion = registry.champion_version(bundle.name) is None
        if champion:
            registry.set_champion(bundle.name, version)
        return {"version": version, "run_id": run.info.run_id, "champion": champion, "metrics": metrics}


def train_recommender(
    events_dir: Path,
    tiers: list[str],
    label_days: int = 14,
    n_train: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train every requested tier on the same windows; return a JSON-able summary."""
    say = progress or (lambda _m: None)
    registry.configure()
    registry.ensure_experiment(EXPERIMENT)
    events = RecEvents.from_dir(events_dir)
    win = windows(events, label_days, n_train)
    out: dict[str, Any] = {"windows": win.as_params(), "tiers": {}}
    for tier in tiers:
        out["tiers"][tier] = train_tier(events, events_dir, tier, win, say)
    return out


def _bundle_ranker(bundle: ModelBundle) -> LambdaRanker:
    return LambdaRanker.from_booster(bundle.booster)


def _test_users(events: RecEvents, events_dir: Path, tier: str, win: RecWindows) -> list[str]:
    users, _ = held_out(events, win)
    if tier == "personalized":
        users = sorted(set(users) & set(consenting_users(events_dir, pd.Index(users), win.test[0])))
    return users


def evaluate_champions(
    events_dir: Path, tiers: list[str], label_days: int = 14, n_train: int = 2
) -> dict[str, Any]:
    """Each tier's champion against popularity on the current held-out window, logged to MLflow."""
    registry.configure()
    registry.ensure_experiment(EXPERIMENT)
    events = RecEvents.from_dir(events_dir)
    win = windows(events, label_days, n_train)
    out: dict[str, Any] = {"windows": win.as_params(), "tiers": {}}
    for tier in tiers:
        bundle = registry.load_bundle(model_name(tier))
        metrics = evaluate(
            events, _bundle_ranker(bundle), tier, win, _test_users(events, events_dir, tier, win)
        )
        with mlflow.start_run(run_name=f"evaluate-{bundle.name}", nested=mlflow.active_run() is not None):
            mlflow.log_params({"model": bundle.name, "version": bundle.version, **win.as_params()})
            mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        out["tiers"][tier] = {"version": bundle.version, "metrics": metrics}
    return out


def promote_recommender(
    events_dir: Path, model: str = "all", label_days: int = 14, n_train: int = 2
) -> dict[str, Any]:
    """The champion/challenger rule for the rankers, on nDCG@10 of the same held-out window."""
    from training.promote import promote

    registry.configure()
    registry.ensure_experiment(EXPERIMENT)
    events = RecEvents.from_dir(events_dir)
    win = windows(events, label_days, n_train)
    names = [model_name(t) for t in rec_tiers()] if model == "all" else [model]
    results = {}
    for name in names:
        tier = name.removeprefix("recommender-")
        users = _test_users(events, events_dir, tier, win)

        def score(bundle: ModelBundle, tier: str = tier, users: list[str] = users) -> dict[str, float]:
            return evaluate(events, _bundle_ranker(bundle), tier, win, users)

        results[name] = promote(name, score, metric=f"ndcg_at_{K}").as_dict()
    return results
