"""`aipic bench serve`: load benchmark of the API as deployed (one uvicorn worker).

Production-like setup: Redis online store (its own Feast project, loaded from the event
tables), PostgreSQL decision log (its own schema in the ``test`` database), models from the
MLflow registry, the server in its own process (`aipic serve`), load from another process
(`wrk` when installed for the closed-loop ceilings, the aiohttp generator in `serving.loadgen`
for the fixed-rate runs). Phases: the no-op endpoint's ceiling, the scoring ceiling, scoring
at a fixed rate, recommendations at a fixed rate.

"Nothing lost" is checked on the server side: the 2xx answers the server gave to scoring and
recommendation calls (its own Prometheus counters) must equal the decisions in the log.
Everything the run creates (schema, Redis keys, bench feature repo) is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from features.settings import Settings, get_settings

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ROUTES = {"score": "/v1/payments/score", "recommendations": "/v1/recommendations", "noop": "/v1/bench/noop"}


class BenchError(RuntimeError):
    """The benchmark cannot run (no models, server did not start, ...). The message says what to do."""


@dataclass(frozen=True)
class BenchConfig:
    duration: float = 10.0
    score_rate: float = 500.0
    rec_rate: float = 100.0
    concurrency: int = 32
    payments: int = 2000
    database_url: str = DEFAULT_PG
    redis_url: str | None = None
    use_wrk: bool = True
    startup_timeout: float = 180.0


Step = Callable[[str], None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


def check_prerequisites(base: Settings) -> None:
    from serving.modelset import DEFAULT_MODELS
    from training.registry import champion_version, configure

    if not (base.events_dir / "payments.parquet").exists():
        raise BenchError(
            f"no event tables in {base.events_dir}: run `make run` (or `aipic data simulate`) first"
        )
    configure(base)
    missing = [n for n in DEFAULT_MODELS if champion_version(n) is None]
    if missing:
        raise BenchError(f"models not registered: {', '.join(missing)}; train them first (`make train`)")


def _bodies(base: Settings, run_id: str, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Payment bodies replayed from the event tables under new ids, and recommendation requests."""
    import pandas as pd

    from features.storage import read_table

    pay = read_table(base.events_dir, "payments")
    pay = pay[pay["kind"] == "purchase"].sort_values("payment_time").tail(n).reset_index(drop=True)
    fields = (
        "card_fingerprint",
        "card_bin_country",
        "billing_country",
        "device_id",
        "ip",
        "ip_country",
        "creator_id",
    )
    scores = []
    for i, row in enumerate(pay.to_dict("records")):
        body: dict[str, Any] = {
            "payment_id": f"bench-{run_id}-{i}",
            "user_id": str(row["user_id"]),
            "item_ids": [str(x) for x in row["item_ids"]][:50] or ["none"],
            "amount": min(float(row["amount"]), 100_000.0),
            "currency": "EUR",
            "payment_time": pd.Timestamp(row["payment_time"]).isoformat(),
        }
        body.update({f: str(row[f]) for f in fields if row.get(f) is not None and not pd.isna(row[f])})
        scores.append(body)
    users = pay["user_id"].astype(str).drop_duplicates().tolist()
    items = pay["item_ids"].explode().dropna().astype(str).drop_duplicates().tolist()
    recs = []
    for i in range(max(len(users), 1)):
        req: dict[str, Any] = {"user_id": users[i % len(users)] if i % 7 else f"bench-new-{i}", "k": 10}
        if i % 3 == 0 and items:
            req["context"] = {"item_id": items[i % len(items)]}
        recs.append(req)
    return scores, recs


def _lua_script(bodies: list[dict[str, Any]], key: str) -> str:
    quoted = ",\n".join(f"[==[{json.dumps(b)}]==]" for b in bodies)
    return f"""
local bodies = {{ {quoted} }}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "{key}"
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{{"requests": %d, "duration_us": %d, "status": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"timeout": %d, "p50_us": %f, "p99_us": %f, "max_us": %f}}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def _wrk(url: str, script: Path, duration: float, concurrency: int) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{int(duration)}s", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("{")][-1]
    r = json.loads(line)
    errors = r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    seconds = r["duration_us"] / 1e6
    return {
        "tool": "wrk",
        "mode": "closed",
        "concurrency": concurrency,
        "requests": r["requests"],
        "requests_per_s": round(r["requests"] / seconds, 1),
        "p50_ms": round(r["p50_us"] / 1000, 3),
        "p99_ms": round(r["p99_us"] / 1000, 3),
        "max_ms": round(r["max_us"] / 1000, 3),
        "errors": errors,
    }


def _loadgen(
    url: str, bodies_file: Path, key: str, mode: str, duration: float, rate: float, concurrency: int
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "serving.loadgen",
        "--url",
        url,
        "--bodies",
        str(bodies_file),
        "--header",
        f"X-API-Key: {key}",
        "--mode",
        mode,
        "--duration",
        str(duration),
        "--rate",
        str(rate),
        "--concurrency",
        str(concurrency),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120, check=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["tool"] = "aiohttp"
    return result


def _metric_2xx(metrics_text: str, route: str) -> int:
    """Server-side count of 2xx answers on a route (from the latency histogram's _count)."""
    total = 0.0
    pattern = re.compile(r"^aipic_http_request_duration_seconds_count\{(?P<labels>[^}]*)\} (?P<v>[0-9.e+]+)$")
    for line in metrics_text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        if labels.get("route") == route and labels.get("status", "").startswith("2"):
            total += float(m.group("v"))
    return int(total)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux ``/proc``; None elsewhere).

    The server's CPU per request is the benchmark figure a busy shared machine distorts least:
    throughput and latency move with other jobs' load, the work done per request much less.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _with_server_cpu(pid: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one load phase; add the server's CPU milliseconds per request it answered."""
    before = process_cpu_seconds(pid)
    result = run()
    after = process_cpu_seconds(pid)
    n = result.get("requests") or 0
    result["server_cpu_ms_per_request"] = (
        round((after - before) * 1000 / n, 3) if before is not None and after is not None and n else None
    )
    return result


@dataclass(frozen=True)
class _Running:
    url: str
    pid: int


@contextlib.contextmanager
def _server(env: dict[str, str], port: int, timeout: float, log: Path) -> Iterator[_Running]:
    import httpx

    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--port", str(port), "--log-level", "warning"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise BenchError(f"the server exited with {proc.returncode}; see {log}")
            try:
                r = httpx.get(f"{url}/readyz", timeout=2)
                if r.status_code == 200:
                    break
                detail = r.json().get("detail")
            except httpx.HTTPError:
                detail = "not listening yet"
            if time.monotonic() > deadline:
                raise BenchError(f"the server was not ready after {timeout:.0f}s ({detail}); see {log}")
            time.sleep(0.5)
        yield _Running(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _prepare_online_store(settings: Settings) -> dict[str, Any]:
    """The Redis online store of the bench project, built like `aipic features build` does
    (offline tables of every feature set, apply, materialise, event state)."""
    from features.store import build_features

    summary = build_features(settings.events_dir, settings)
    state: dict[str, Any] = summary.get("online_state", {})
    return state


def _cleanup_redis(url: str, project: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    n = 0
    batch = []
    for key in client.scan_iter(match=f"*{project}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            n += int(client.delete(*batch))
            batch = []
    if batch:
        n += int(client.delete(*batch))
    return n


def run_bench(cfg: BenchConfig, base: Settings | None = None, step: Step | None = None) -> dict[str, Any]:
    """Run every phase and return the result document (see module docstring)."""
    from sqlalchemy import create_engine, text

    from serving.auth import ApiKeyStore
    from serving.decisions import ensure_tables

    say = step or (lambda _msg: None)
    base = base or get_settings()
    check_prerequisites(base)
    run_id = secrets.token_hex(4)
    project = f"bench_{run_id}"
    schema = f"aipic_bench_{run_id}"
    work = Path(tempfile.mkdtemp(prefix="aipic-bench-"))
    bench_var = work / "var"
    (bench_var / "data").mkdir(parents=True)
    (bench_var / "data" / "marketplace").symlink_to(base.events_dir.resolve(), target_is_directory=True)
    db_url = _with_search_path(cfg.database_url, schema)
    redis_url = cfg.redis_url or base.redis_url
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIPIC_")},
        "AIPIC_ENVIRONMENT": "local",
        "AIPIC_VAR_DIR": str(bench_var),
        "AIPIC_ONLINE_STORE": "redis",
        "AIPIC_REDIS_URL": redis_url,
        "AIPIC_FEAST_PROJECT": project,
        "AIPIC_DATABASE_URL": db_url,
        "AIPIC_MLFLOW_TRACKING_URI": base.resolved_mlflow_uri,
        "AIPIC_BENCH_NOOP_ENDPOINT": "true",
        "AIPIC_API_RATE_LIMIT": "1000000/second",
        "AIPIC_MODEL_POLL_SECONDS": "0",
        "AIPIC_JWT_SECRET": secrets.token_urlsafe(48),
    }
    settings = Settings(
        var_dir=bench_var,
        online_store="redis",
        redis_url=redis_url,
        feast_project=project,
        database_url=db_url,
        mlflow_tracking_uri=base.resolved_mlflow_uri,
    )
    admin = create_engine(cfg.database_url)
    result: dict[str, Any] = {}
    try:
        say("database schema and API key")
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        engine = create_engine(db_url)
        ensure_tables(engine)
        _, key = ApiKeyStore(engine).create(["score", "recommend"], "bench")
        say("Redis online store")
        loaded = _prepare_online_store(settings)
        scores, recs = _bodies(base, run_id, cfg.payments)
        files = {"score": work / "score.json", "recommendations": work / "recs.json"}
        files["score"].write_text(json.dumps(scores))
        files["recommendations"].write_text(json.dumps(recs))
        port = _free_port()
        say("starting the server (one uvicorn worker)")
        with _server(env, port, cfg.startup_timeout, work / "server.log") as server:
            url = server.url
            wrk = cfg.use_wrk and shutil.which("wrk") is not None
            script = work / "score.lua"
            if wrk:
                script.write_text(_lua_script(scores, key))

            def ceiling(route: str) -> dict[str, Any]:
                if wrk:
                    return _with_server_cpu(
                        server.pid, lambda: _wrk(url + route, script, cfg.duration, cfg.concurrency)
                    )
                return _with_server_cpu(
                    server.pid,
                    lambda: _loadgen(
                        url + route, files["score"], key, "closed", cfg.duration, 0, cfg.concurrency
                    ),
                )

            say("warm-up")
            _loadgen(url + ROUTES["score"], files["score"], key, "closed", 2, 0, 8)
            _loadgen(url + ROUTES["recommendations"], files["recommendations"], key, "closed", 2, 0, 4)
            say(f"no-op ceiling ({cfg.duration:.0f}s)")
            noop = ceiling(ROUTES["noop"])
            time.sleep(1)
            say(f"scoring ceiling ({cfg.duration:.0f}s)")
            score_max = ceiling(ROUTES["score"])
            time.sleep(1)
            say(f"scoring at {cfg.score_rate:.0f}/s ({cfg.duration:.0f}s)")
            score = _with_server_cpu(
                server.pid,
                lambda: _loadgen(
                    url + ROUTES["score"],
                    files["score"],
                    key,
                    "fixed",
                    cfg.duration,
                    cfg.score_rate,
                    cfg.concurrency,
                ),
            )
            time.sleep(1)
            say(f"recommendations at {cfg.rec_rate:.0f}/s ({cfg.duration:.0f}s)")
            rec = _with_server_cpu(
                server.pid,
                lambda: _loadgen(
                    url + ROUTES["recommendations"],
                    files["recommendations"],
                    key,
                    "fixed",
                    cfg.duration,
                    cfg.rec_rate,
                    cfg.concurrency,
                ),
            )
            time.sleep(1)
            import httpx

            metrics = httpx.get(f"{url}/metrics", timeout=10).text
        answered = _metric_2xx(metrics, ROUTES["score"]) + _metric_2xx(metrics, ROUTES["recommendations"])
        with engine.connect() as conn:
            logged = int(conn.execute(text("SELECT count(*) FROM decision_log")).scalar_one())
        keep = ("requests_per_s", "p50_ms", "p99_ms", "errors", "server_cpu_ms_per_request")
        score_out = {k: score[k] for k in keep} | {
            "target_rate": cfg.score_rate,
            "max_requests_per_s": score_max["requests_per_s"],
            "max_p99_ms": score_max["p99_ms"],
            "share_of_noop": round(score_max["requests_per_s"] / max(noop["requests_per_s"], 1e-9), 3),
            "max_server_cpu_ms_per_request": score_max["server_cpu_ms_per_request"],
        }
        result = {
            "noop": {k: noop[k] for k in keep},
            "score": score_out,
            "recommendations": {k: rec[k] for k in keep} | {"target_rate": cfg.rec_rate},
            "responses_2xx": answered,
            "decisions_logged": logged,
            "targets": {
                "score_p99_le_10ms_at_500": score["p99_ms"] is not None and score["p99_ms"] <= 10.0,
                "score_ge_half_noop": score_out["share_of_noop"] >= 0.5,
                "recommendations_p99_le_30ms_at_100": rec["p99_ms"] is not None and rec["p99_ms"] <= 30.0,
                "zero_errors": noop["errors"] + score["errors"] + rec["errors"] + score_max["errors"] == 0,
                "nothing_lost": answered == logged,
            },
            "phases": {
                "noop": noop,
                "score_ceiling": score_max,
                "score_fixed": score,
                "recommendations_fixed": rec,
            },
            "setup": {
                "config": asdict(cfg),
                "tool_ceiling": "wrk" if wrk else "aiohttp",
                "tool_fixed_rate": "aiohttp (open loop)",
                "online_store": "redis",
                "decision_log": "postgresql",
                "online_state_loaded": loaded,
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg(),  # at the end of the run: how busy the machine was
            },
        }
        return result
    finally:
        with contextlib.suppress(Exception), admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
        with contextlib.suppress(Exception):
            _cleanup_redis(redis_url, project)
        shutil.rmtree(work, ignore_errors=True)


def render(result: dict[str, Any], score_rate: float, rec_rate: float) -> Any:
    """The rich table `aipic bench serve` prints."""
    from rich.table import Table

    table = Table(title="aipic bench serve (one uvicorn worker, Redis online store, PostgreSQL log)")
    for col in ("phase", "requests/s", "p50 ms", "p99 ms", "errors", "server CPU ms/req"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    rows = [
        ("no-op ceiling", result["phases"]["noop"]),
        ("score ceiling", result["phases"]["score_ceiling"]),
        (f"score at {score_rate:.0f}/s", result["phases"]["score_fixed"]),
        (f"recommendations at {rec_rate:.0f}/s", result["phases"]["recommendations_fixed"]),
    ]
    for name, r in rows:
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.2f}"
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.2f}"
        cpu = r.get("server_cpu_ms_per_request")
        table.add_row(
            name,
            f"{r['requests_per_s']:.0f}",
            p50,
            p99,
            str(r["errors"]),
            "-" if cpu is None else f"{cpu:.2f}",
        )
    load = result.get("setup", {}).get("load_average")
    table.caption = (
        (f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min); " if load else "")
        + f"2xx answers (score + recommendations) {result['responses_2xx']} = decisions logged "
        f"{result['decisions_logged']}: "
        + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in result["targets"].items())
    )
    return table
