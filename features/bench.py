"""`aipic bench features`: offline build throughput, online read latency, real-time update cost.

Each offline build runs in a fresh (spawned) process so its peak resident memory is its own.
Data sets are created once under ``<var>/bench/`` and reused: a simulated marketplace of about
a million payments, the imported fraud handbook (1.6 M payments) and a smaller simulated
marketplace (about 100 k payments) whose event state backs the online measurements.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import shutil
import statistics
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.settings import Settings, get_settings

DEFAULT_HANDBOOK = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "fraud-handbook" / "transactions.parquet"
)


@dataclass
class BenchConfig:
    simulated_users: int = 200_000  # about 0.96 M payments over 60 days
    simulated_days: int = 60
    online_users: int = 20_000  # about 100 k payments: the state behind the online reads
    online_days: int = 60
    handbook: Path | None = DEFAULT_HANDBOOK
    reads: int = 2_000
    backends: tuple[str, ...] = ("sqlite", "redis")
    seed: int = 7


@dataclass
class BenchRow:
    measurement: str
    setting: str
    value: str
    raw: dict[str, Any] = field(default_factory=dict)


def _offline_child(events_dir: str) -> dict[str, Any]:
    from features.payment_features import BuildStats, payment_feature_frame

    stats: list[BuildStats] = []
    t0 = resource.getrusage(resource.RUSAGE_SELF)
    frame = payment_feature_frame(Path(events_dir), stats=stats)
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "payments": stats[0].payments,
        "seconds": stats[0].seconds,
        "payments_per_second": stats[0].payments_per_second,
        "cpu_seconds": (t1.ru_utime - t0.ru_utime) + (t1.ru_stime - t0.ru_stime),
        "peak_rss_mb": t1.ru_maxrss / 1024,
        "columns": frame.shape[1],
    }


def bench_offline(events_dir: Path) -> dict[str, Any]:
    """Build the payment feature frame in a fresh process; throughput and peak memory."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_offline_child, str(events_dir)).result()


def ensure_simulated(directory: Path, users: int, days: int, seed: int) -> Path:
    from features.simulate import SimulationConfig, simulate_to_dir

    marker = directory / f".config-{users}-{days}-{seed}"
    if not marker.exists():
        shutil.rmtree(directory, ignore_errors=True)
        simulate_to_dir(SimulationConfig(users=users, days=days, seed=seed), directory)
        marker.touch()
    return directory


def ensure_handbook(directory: Path, source: Path) -> Path:
    from features.importers import import_fraud_handbook

    marker = directory / ".imported"
    if not marker.exists():
        shutil.rmtree(directory, ignore_errors=True)
        import_fraud_handbook(source, directory)
        marker.touch()
    return directory


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ms = sorted(s / 1e6 for s in samples_ns)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50_ms": q[49], "p99_ms": q[98], "mean_ms": statistics.fmean(ms), "n": len(ms)}


def bench_online(events_dir: Path, backend: str, reads: int, base: Settings) -> dict[str, Any]:
    """Load the event state of ``events_dir`` into a fresh project; time reads and updates."""
    import pandas as pd

    from features.events import Payment
    from features.heap import settle_heap
    from features.online import OnlineFeatures, load_state, score_online
    from features.store import (
        apply_repo,
        materialize_repo,
        open_feature_store,
        teardown_project,
        write_profile_tables,
    )

    work = base.var_dir / "bench" / f"online-{backend}-{uuid.uuid4().hex[:8]}"
    s = base.model_copy(
        update={"var_dir": work, "online_store": backend, "feast_project": f"bench_{uuid.uuid4().hex[:10]}"}
    )
    write_profile_tables(events_dir, s.feature_repo_dir / "offline")
    store = open_feature_store(s)
    online = None
    try:
        apply_repo(store, s)
        materialize_repo(store, s)
        online = OnlineFeatures(s, store=store)
        # live traffic: the state holds everything before the last `reads` payments, which are
        # then scored in time order (read, then update) as the scoring path does
        pay = pd.read_parquet(events_dir / "payments.parquet")
        pay = pay[pay["kind"] == "purchase"].sort_values(["payment_time", "payment_id"])
        if not 0 < reads < len(pay):
            raise ValueError(f"{reads} live payments asked for, {len(pay)} purchases in {events_dir}")
        cutoff = pay["payment_time"].iloc[-reads].to_pydatetime()
        pay = pay[pay["payment_time"] >= cutoff]
        t0 = time.perf_counter()
        counts = load_state(online, events_dir, until=cutoff)
        load_seconds = time.perf_counter() - t0
        models = [
            Payment.model_validate({**r, "item_ids": list(r["item_ids"])}) for r in pay.to_dict("records")
        ]
        for m in models[:100]:  # warm caches and connections (reads change nothing)
            online.payment_vector(m)
        settle_heap()  # as the API does once loaded (`serving.services`): no full GC walks the heap
        read_ns, update_ns, score_ns = [], [], []
        cpu_ns = 0
        for m in models:
            a = time.perf_counter_ns()
            online.payment_vector(m)  # a read alone
            b = time.perf_counter_ns()
            cpu = time.process_time_ns()
            score_online(online, m)  # what scoring does: the read and the payment applied, one call
            cpu_ns += time.process_time_ns() - cpu
            c = time.perf_counter_ns()
            online.update(m)  # the update alone (applying a payment again changes nothing)
            d = time.perf_counter_ns()
            read_ns.append(b - a)
            score_ns.append(c - b)
            update_ns.append(d - c)
        cpu_ms = cpu_ns / 1e6 / max(len(models), 1)
        return {
            "backend": backend,
            "client_cpu_ms_per_score": cpu_ms,
            "state": counts,
            "state_load_seconds": load_seconds,
            "read": _percentiles(read_ns),
            "update": _percentiles(update_ns),
            "score_path": _percentiles(score_ns),
        }
    finally:
        if online is not None:
            online.state.clear()
            online.close()
        with contextlib.suppress(Exception):  # a project that failed before apply has nothing to remove
            teardown_project(store)
        shutil.rmtree(work, ignore_errors=True)


def run_feature_bench(
    cfg: BenchConfig, settings: Settings | None = None, on_step: Callable[[str], None] | None = None
) -> list[BenchRow]:
    """Every measurement of the issue's benchmark table, in order."""
    s = settings or get_settings()
    root = s.var_dir / "bench"
    rows: list[BenchRow] = []

    def step(msg: str) -> None:
        if on_step:
            on_step(msg)

    def offline_rows(label: str, events: Path) -> None:
        step(f"offline build: {label}")
        r = bench_offline(events)
        setting = f"{label}: {r['payments']:,} payments"
        rows.append(
            BenchRow("offline build throughput", setting, f"{r['payments_per_second']:,.0f} payments/s", r)
        )
        rows.append(
            BenchRow(
                "offline build time", setting, f"{r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU", r
            )
        )
        rows.append(BenchRow("offline build peak memory", setting, f"{r['peak_rss_mb']:,.0f} MB", r))

    step("simulating the large marketplace (cached)")
    big = ensure_simulated(
        root / f"sim-{cfg.simulated_users}", cfg.simulated_users, cfg.simulated_days, cfg.seed
    )
    offline_rows("simulated", big)
    if cfg.handbook is not None:
        if cfg.handbook.exists():
            step("importing the fraud handbook (cached)")
            offline_rows("fraud handbook", ensure_handbook(root / "handbook", cfg.handbook))
        else:
            rows.append(
                BenchRow("offline build throughput", "fraud handbook", f"skipped: {cfg.handbook} missing")
            )
    step("simulating the online marketplace (cached)")
    small = ensure_simulated(root / f"sim-{cfg.online_users}", cfg.online_users, cfg.online_days, cfg.seed)
    for backend in cfg.backends:
        step(f"online store: {backend}")
        try:
            r = bench_online(small, backend, cfg.reads, s)
        except Exception as exc:  # a missing server is a result, not a crash
            why = str(exc) if isinstance(exc, ValueError) else type(exc).__name__  # driver text may hold keys
            rows.append(BenchRow("online retrieval", backend, f"unavailable: {why}"))
            continue
        rd, up, sc = r["read"], r["update"], r["score_path"]
        setting = f"{backend}, {r['state']['payments']:,} payments in state, {r['read']['n']:,} live"
        rows.append(
            BenchRow(
                "online retrieval (one score request)",
                setting,
                f"p50 {rd['p50_ms']:.3f} ms, p99 {rd['p99_ms']:.3f} ms",
                r,
            )
        )
        rows.append(
            BenchRow(
                "real-time update (one payment)",
                setting,
                f"p50 {up['p50_ms']:.3f} ms, p99 {up['p99_ms']:.3f} ms",
                r,
            )
        )
        rows.append(
            BenchRow(
                "score path (read + update, one call)",
                setting,
                f"p50 {sc['p50_ms']:.3f} ms, p99 {sc['p99_ms']:.3f} ms",
                r,
            )
        )
        rows.append(
            BenchRow("client CPU per score path", setting, f"{r['client_cpu_ms_per_score']:.3f} ms", r)
        )
        rows.append(BenchRow("online state load", setting, f"{r['state_load_seconds']:.1f} s", r))
    rows.append(
        BenchRow(
            "machine load (1/5/15 min)",
            f"{os.cpu_count()} CPUs",
            " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        )
    )
    return rows


def render(rows: list[BenchRow]) -> Any:
    from rich.table import Table

    table = Table(title="aipic bench features")
    table.add_column("measurement")
    table.add_column("data / store")
    table.add_column("result", justify="right")
    for r in rows:
        table.add_row(r.measurement, r.setting, r.value)
    return table
