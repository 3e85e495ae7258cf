"""`aipic train …`: train, evaluate and promote models through MLflow."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from features.settings import get_settings

train_app = typer.Typer(help="Train, evaluate and promote models (tracked in MLflow).", no_args_is_help=True)

EventsOpt = Annotated[
    Path | None, typer.Option("--events", help="Event tables (default var/data/marketplace).")
]
TierOpt = Annotated[str, typer.Option("--tier", help="One tier, or 'all'.")]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _events(events: Path | None) -> Path:
    path = events or get_settings().events_dir
    if not (path / "payments.parquet").exists():
        raise _fail(f"no payments.parquet in {path}: run `aipic data simulate --out {path}` first")
    return path


def _tiers(tier: str, known: list[str]) -> list[str]:
    if tier == "all":
        return known
    if tier not in known:
        raise _fail(f"unknown tier {tier!r}; known: {', '.join(known)}")
    return [tier]


def _in_project_run(fn: Callable[..., None]) -> Callable[..., None]:
    """Under `mlflow run`, nest every run the command starts under the project's run."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from training.registry import RegistryError, configure, project_run

        configure()
        try:
            with project_run():
                fn(*args, **kwargs)
        except RegistryError as exc:
            raise _fail(str(exc)) from None

    return wrapper


def _say(message: str) -> None:
    typer.secho(f"· {message}", fg=typer.colors.CYAN, err=True)


@train_app.command("fraud")
@_in_project_run
def fraud_cmd(
    events: EventsOpt = None,
    tier: TierOpt = "all",
    train_days: Annotated[
        float, typer.Option(min=0, help="Days of labelled history to train on (0 = all).")
    ] = 0,
    label_delay_days: Annotated[
        float, typer.Option(help="Days left out because labels are not known yet (-1 = settings).")
    ] = -1,
) -> None:
    """Train one fraud model per tier; print a JSON summary (versions, metrics)."""
    from training.fraud import to_json, train_fraud
    from training.fraud_data import TrainingDataError, fraud_tiers

    path = _events(events)
    try:
        summary = train_fraud(
            path,
            _tiers(tier, fraud_tiers()),
            train_days=int(train_days),
            label_delay_days=int(label_delay_days) if label_delay_days >= 0 else None,
            progress=_say,
        )
    except TrainingDataError as exc:
        raise _fail(str(exc)) from None
    typer.echo(to_json(summary))


@train_app.command("evaluate-fraud")
@_in_project_run
def evaluate_fraud_cmd(events: EventsOpt = None, tier: TierOpt = "all") -> None:
    """Score each tier's champion on the current held-out window; print metrics as JSON."""
    from training.fraud import evaluate_champions, to_json
    from training.fraud_data import TrainingDataError, fraud_tiers

    path = _events(events)
    try:
        out = evaluate_champions(path, _tiers(tier, fraud_tiers()), progress=_say)
    except TrainingDataError as exc:
        raise _fail(str(exc)) from None
    typer.echo(to_json(out))


@train_app.command("recommender")
@_in_project_run
def recommender_cmd(events: EventsOpt = None, tier: TierOpt = "all") -> None:
    """Train one ranker per recommendation tier; print a JSON summary (versions, metrics)."""
    from training.fraud import to_json
    from training.recommender import RecTrainingError, rec_tiers, train_recommender

    path = _events(events)
    try:
        out = train_recommender(path, _tiers(tier, rec_tiers()), progress=_say)
    except RecTrainingError as exc:
        raise _fail(str(exc)) from None
    typer.echo(to_json(out))


@train_app.command("evaluate-recommender")
@_in_project_run
def evaluate_recommender_cmd(events: EventsOpt = None, tier: TierOpt = "all") -> None:
    """Score each ranker champion and popularity on the current held-out window; print JSON."""
    from training.fraud import to_json
    from training.recommender import evaluate_champions, rec_tiers

    path = _events(events)
    try:
        out = evaluate_champions(path, _tiers(tier, rec_tiers()))
    except LookupError as exc:
        raise _fail(str(exc)) from None
    typer.echo(to_json(out))


@train_app.command("promote")
@_in_project_run
def promote_cmd(
    events: EventsOpt = None,
    model: Annotated[str, typer.Option("--model", help="fraud-<tier>, recommender-<tier> or 'all'.")] = "all",
) -> None:
    """Promote each challenger that beats its champion on the same held-out window (both scored now)."""
    from training.fraud import promote_fraud, to_json
    from training.fraud_data import TrainingDataError
    from training.recommender import promote_recommender

    if not (model == "all" or model.startswith(("fraud-", "recommender-"))):
        raise _fail(f"unknown model {model!r}: use fraud-<tier>, recommender-<tier> or all")
    path = _events(events)
    out = {}
    try:
        if model == "all" or model.startswith("fraud-"):
            out.update(promote_fraud(path, model, progress=_say))
        if model == "all" or model.startswith("recommender-"):
            out.update(promote_recommender(path, model))
    except (TrainingDataError, LookupError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(to_json(out))


@train_app.command("all")
@_in_project_run
def all_cmd(events: EventsOpt = None) -> None:
    """Train every fraud tier and every recommendation tier (what `make run` does)."""
    from training.fraud import to_json, train_fraud
    from training.fraud_data import TrainingDataError, fraud_tiers
    from training.recommender import RecTrainingError, rec_tiers, train_recommender

    path = _events(events)
    try:
        fraud = train_fraud(path, fraud_tiers(), progress=_say)
        recs = train_recommender(path, rec_tiers(), progress=_say)
    except (TrainingDataError, RecTrainingError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(to_json({"fraud": fraud, "recommender": recs}))
