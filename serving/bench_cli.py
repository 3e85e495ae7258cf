"""`aipic bench …`: the benchmarks of each stage (one command per stage)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

bench_app = typer.Typer(help="Benchmarks: throughput and latency of each stage.", no_args_is_help=True)


@bench_app.command("features")
def features_bench(
    simulated_users: Annotated[
        int, typer.Option(min=10, help="Buyers of the large simulated set.")
    ] = 200_000,
    simulated_days: Annotated[int, typer.Option(min=1, help="Days of the large simulated set.")] = 60,
    online_users: Annotated[
        int, typer.Option(min=10, help="Buyers of the set behind the online state.")
    ] = 20_000,
    handbook: Annotated[
        Path | None, typer.Option(help="Fraud-handbook transactions.parquet (default ../shared/data/...).")
    ] = None,
    no_handbook: Annotated[bool, typer.Option(help="Skip the fraud-handbook build.")] = False,
    reads: Annotated[int, typer.Option(min=110, help="Online reads/updates timed per store.")] = 2_000,
    backends: Annotated[
        str, typer.Option(help="Comma-separated online stores: sqlite,redis.")
    ] = "sqlite,redis",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the raw figures here.")] = None,
) -> None:
    """Offline build throughput and memory; online read p50/p99 on SQLite and Redis; update cost."""
    from rich.console import Console

    from features.bench import DEFAULT_HANDBOOK, BenchConfig, render, run_feature_bench

    chosen = tuple(b.strip() for b in backends.split(",") if b.strip())
    bad = set(chosen) - {"sqlite", "redis"}
    if bad:
        typer.secho(f"error: unknown backends {sorted(bad)}; use sqlite and/or redis", fg="red", err=True)
        raise typer.Exit(code=2)
    cfg = BenchConfig(
        simulated_users=simulated_users,
        simulated_days=simulated_days,
        online_users=online_users,
        handbook=None if no_handbook else (handbook or DEFAULT_HANDBOOK),
        reads=reads,
        backends=chosen,
    )
    console = Console()
    with console.status("benchmarking features") as status:
        rows = run_feature_bench(cfg, on_step=lambda msg: status.update(msg))
    console.print(render(rows))
    if json_out is not None:
        json_out.write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=str))


@bench_app.command("online-retail")
def online_retail_bench(
    data: Annotated[Path, typer.Option(help="Online Retail transactions.parquet.")] = Path(
        "../shared/data/online-retail/transactions.parquet"
    ),
    train_end: Annotated[str, typer.Option(help="First day of the test period (YYYY-MM-DD).")] = "2011-09-01",
    test_end: Annotated[str, typer.Option(help="Day after the test period (YYYY-MM-DD).")] = "2011-11-01",
    max_users: Annotated[int | None, typer.Option(min=10, help="Evaluate on a sample of persons.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result here.")] = None,
) -> None:
    """Next-purchase recommendation on the UCI Online Retail data: aipic ranker vs baselines."""
    from training.bench_recommender import BenchConfig, BenchError, print_table, run, write_json

    try:
        result = run(BenchConfig(data=data, train_end=train_end, test_end=test_end, max_users=max_users))
    except BenchError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(code=2) from None
    print_table(result)
    if json_out is not None:
        write_json(result, json_out)


@bench_app.command("serve")
def serve_bench(
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result document here.")] = None,
    duration: Annotated[float, typer.Option(min=2, help="Seconds per phase.")] = 10.0,
    score_rate: Annotated[
        float, typer.Option(min=1, help="Fixed rate of the scoring phase (requests/s).")
    ] = 500.0,
    rec_rate: Annotated[float, typer.Option(min=1, help="Fixed rate of the recommendation phase.")] = 100.0,
    database_url: Annotated[
        str, typer.Option(help="PostgreSQL of the decision log (a throw-away schema is used).")
    ] = "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    wrk: Annotated[bool, typer.Option(help="Use wrk for the closed-loop ceilings when installed.")] = True,
) -> None:
    """API under load: one uvicorn worker, Redis online store, PostgreSQL decision log."""
    from rich.console import Console

    from serving.bench import BenchConfig, BenchError, render, run_bench

    cfg = BenchConfig(
        duration=duration, score_rate=score_rate, rec_rate=rec_rate, database_url=database_url, use_wrk=wrk
    )
    try:
        with Console(stderr=True).status("benchmarking the API") as status:
            result = run_bench(cfg, step=lambda msg: status.update(msg))
    except BenchError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(code=1) from None
    Console().print(render(result, score_rate, rec_rate))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2, default=str))


@bench_app.command("fraud-handbook")
def fraud_handbook_bench(
    data: Annotated[Path, typer.Option(help="The handbook's transactions.parquet.")] = Path(
        "../shared/data/fraud-handbook/transactions.parquet"
    ),
    train_start: Annotated[
        str, typer.Option(help="Training start of the first fold (2018-08-15 test, 2018-07-11 validation).")
    ] = "2018-08-15",
    folds: Annotated[int, typer.Option(min=1, help="Folds; each earlier fold starts 7 days before.")] = 4,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result document here.")] = None,
    max_cards: Annotated[
        int | None, typer.Option(min=20, help="Use a random subset of cards (quick runs).")
    ] = None,
    speed_rows: Annotated[
        int, typer.Option(min=0, help="Payments of the one-model training-speed measurement (0 = skip).")
    ] = 1_000_000,
    threads: Annotated[int, typer.Option(min=1, help="Threads for LightGBM, DuckDB and the forest.")] = 2,
) -> None:
    """The handbook's prequential protocol: aipic LightGBM, LR and RF beside the published table."""
    from training.bench_fraud import run_fraud_handbook_cli

    run_fraud_handbook_cli(data, train_start, folds, json_out, max_cards, speed_rows, threads)
