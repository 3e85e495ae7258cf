"""`aipic data …` and `aipic features …`: event data in, feature tables out."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from features.settings import get_settings

data_app = typer.Typer(help="Marketplace event data: simulate, import, validate.", no_args_is_help=True)
features_app = typer.Typer(help="Feature pipelines and the Feast repo.", no_args_is_help=True)


class Dataset(StrEnum):
    FRAUD_HANDBOOK = "fraud-handbook"
    ONLINE_RETAIL = "online-retail"


def fail(message: str) -> typer.Exit:
    """Print a clear error (no stack trace) and return the exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@data_app.command("simulate")
def simulate_cmd(
    users: Annotated[
        int | None, typer.Option(min=10, help="Number of buyers (default from settings).")
    ] = None,
    days: Annotated[
        int | None,
        typer.Option(min=1, max=3650, help="Days of marketplace activity (default from settings)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = -1,
    out: Annotated[Path | None, typer.Option(help="Output directory (default var/data/marketplace).")] = None,
) -> None:
    """Simulate a marketplace with planted fraud and consent behaviour; print a JSON summary."""
    from features.simulate import SimulationConfig, SimulationError, simulate_to_dir

    s = get_settings()
    try:
        cfg = SimulationConfig(
            users=s.default_users if users is None else users,
            days=s.default_days if days is None else days,
            seed=s.default_seed if seed < 0 else seed,
        )
        summary = simulate_to_dir(cfg, out or s.events_dir, progress=True)
    except SimulationError as exc:
        raise fail(str(exc)) from None
    typer.echo(json.dumps(summary, indent=2, default=str))


@data_app.command("import")
def import_cmd(
    dataset: Annotated[Dataset, typer.Argument(help="Which public data set.")],
    source: Annotated[Path, typer.Option(help="Path of the data set's transactions.parquet.")],
    out: Annotated[Path, typer.Option(help="Output directory for the event tables.")],
) -> None:
    """Map a public data set into the marketplace event model; print a JSON summary."""
    from features.importers import DataImportError, import_fraud_handbook, import_online_retail

    try:
        if dataset is Dataset.FRAUD_HANDBOOK:
            summary = import_fraud_handbook(source, out, progress=True)
        else:
            summary = import_online_retail(source, out, progress=True)
    except DataImportError as exc:
        raise fail(str(exc)) from None
    typer.echo(json.dumps(summary, indent=2, default=str))


@data_app.command("validate")
def validate_cmd(
    directory: Annotated[Path, typer.Argument(help="Directory of event tables.")],
) -> None:
    """Check every table in DIR against the event model; print row counts as JSON."""
    import pyarrow.parquet as pq

    from features.events import TABLES
    from features.storage import SchemaError, table_path, validate

    counts: dict[str, int] = {}
    for name, model in TABLES.items():
        path = table_path(directory, name)
        if not path.exists():
            continue
        try:
            at = pq.read_table(path)
            validate(at, model)
        except SchemaError as exc:
            raise fail(str(exc)) from None
        counts[name] = at.num_rows
    if not counts:
        raise fail(f"no event tables found in {directory}")
    typer.echo(json.dumps({"directory": str(directory), "rows": counts}, indent=2))


@features_app.command("build")
def build_cmd(
    events: Annotated[Path | None, typer.Option(help="Event tables (default var/data/marketplace).")] = None,
    online_state: Annotated[bool, typer.Option(help="Also load the online event state.")] = True,
) -> None:
    """Compute the offline feature tables, apply the Feast repo, materialise; print a JSON summary."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from features.payment_features import FeaturePipelineError
    from features.store import StoreError, build_features

    s = get_settings()
    events_dir = events or s.events_dir
    if not (events_dir / "payments.parquet").exists():
        raise fail(f"{events_dir}/payments.parquet not found: simulate or import events first")
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True
    ) as progress:
        task = progress.add_task("features", total=None)

        def on_step(name: str, done: int, total: int) -> None:
            progress.update(task, description=name, completed=done, total=total)

        try:
            summary = build_features(events_dir, s, on_step=on_step, load_online_state=online_state)
        except (FeaturePipelineError, StoreError, FileNotFoundError) as exc:
            raise fail(str(exc)) from None
    typer.echo(json.dumps(summary, indent=2, default=str))
