"""The `aipic` command line: one sub-command group per stage.

Heavy libraries (Feast, MLflow, LightGBM) are imported inside commands, so `aipic --help`
stays fast and nothing happens at import time.
"""

from __future__ import annotations

import typer

from features.cli import data_app, features_app
from features.privacy.cli import privacy_app
from serving.bench_cli import bench_app
from serving.serve_cli import auth_app, models_app, serve
from training.cli import train_app

app = typer.Typer(
    help="aipic-ml: fraud scoring, recommendations and explanations for AIpicMarket.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
app.add_typer(train_app, name="train")
app.add_typer(privacy_app, name="privacy")
app.add_typer(auth_app, name="auth")
app.add_typer(models_app, name="models")
app.command("serve")(serve)
app.add_typer(bench_app, name="bench")


if __name__ == "__main__":  # pragma: no cover
    app()
