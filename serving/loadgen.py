"""A small HTTP load generator (aiohttp + uvloop), run as its own process by `aipic bench serve`.

Two modes:

* ``fixed``: open loop at a fixed rate. Request *i* is due at ``t0 + i / rate``; its latency
  is measured from that due time, so a server (or client) falling behind shows up in the
  percentiles instead of silently lowering the rate (no coordinated omission).
* ``closed``: ``concurrency`` workers send back to back for ``duration`` seconds; gives the
  throughput ceiling.

Every request started is awaited before the summary is printed (one JSON line on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    non_2xx: int = 0
    failures: int = 0
    status: dict[int, int] = field(default_factory=dict)

    def summary(self, elapsed: float) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1000.0
        n = self.ok + self.non_2xx + self.failures
        return {
            "requests": n,
            "responses_2xx": self.ok,
            "errors": self.non_2xx + self.failures,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "duration_s": round(elapsed, 3),
            "requests_per_s": round(n / elapsed, 1) if elapsed > 0 else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
            "p90_ms": round(float(np.percentile(lat, 90)), 3) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
            "max_ms": round(float(lat.max()), 3) if len(lat) else None,
        }


async def _send(
    session: Any, url: str, body: bytes, headers: dict[str, str], tally: Tally, due: float
) -> None:
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            code = resp.status
    except Exception:
        tally.failures += 1
        return
    tally.latencies.append(time.perf_counter() - due)
    tally.status[code] = tally.status.get(code, 0) + 1
    if 200 <= code < 300:
        tally.ok += 1
    else:
        tally.non_2xx += 1


async def run(
    url: str,
    bodies: list[bytes],
    headers: dict[str, str],
    mode: str,
    duration: float,
    rate: float,
    concurrency: int,
) -> dict[str, Any]:
    import aiohttp

    tally = Tally()
    connector = aiohttp.TCPConnector(limit=max(concurrency, 64), ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=30)
    hdrs = {"content-type": "application/json", **headers}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        if mode == "fixed":
            tasks: set[asyncio.Task[None]] = set()
            total = int(duration * rate)
            for i in range(total):
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(_send(session, url, bodies[i % len(bodies)], hdrs, tally, due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
            elapsed = max(time.perf_counter() - start, total / rate)
        else:
            stop_at = start + duration
            counter = iter(range(10**12))

            async def worker() -> None:
                while time.perf_counter() < stop_at:
                    i = next(counter)
                    await _send(session, url, bodies[i % len(bodies)], hdrs, tally, time.perf_counter())

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
    out = tally.summary(elapsed)
    out.update({"mode": mode, "target_rate": rate if mode == "fixed" else None, "concurrency": concurrency})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--bodies", type=Path, required=True, help="JSON list of request bodies")
    parser.add_argument("--header", action="append", default=[], help="Name: value")
    parser.add_argument("--mode", choices=("fixed", "closed"), default="fixed")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    bodies = [json.dumps(b).encode() for b in json.loads(args.bodies.read_text())]
    headers = dict(h.split(": ", 1) for h in args.header)
    coro = run(args.url, bodies, headers, args.mode, args.duration, args.rate, args.concurrency)
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:  # pragma: no cover
        result = asyncio.run(coro)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
