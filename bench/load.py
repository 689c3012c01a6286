"""Bounded load test against a vqsearch server on loopback: concurrent clients mixing search,
nearest and appends for a fixed time; reports throughput, p50/p99 latency, errors, and the
server's RSS under load after warm-up and once the load has stopped (`run`). Stops by itself.

    python bench/load.py [--clients 32] [--seconds 60]   # starts its own server on 127.0.0.1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from vqsearch.client import AsyncClient, VQSearchClientError

D, NB = 64, 16384


def serve(
    data: str, port: int, args: list[str] | None = None, **env: str
) -> subprocess.Popen[bytes]:
    """`vqsearch serve [args]` on 127.0.0.1:port over the data dir, once it answers /readyz."""
    full = {
        **os.environ,
        "VQSEARCH_DATA_DIR": data,
        "VQSEARCH_PORT": str(port),
        "VQSEARCH_LOG_LEVEL": "warning",
        **env,
    }
    proc = subprocess.Popen([sys.executable, "-m", "vqsearch", "serve", *(args or [])], env=full)
    for _ in range(600):
        try:
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run(
    url: str,
    pid: int,
    clients: int = 32,
    seconds: float = 60,
    warmup: float = 0.2,
    settle: float = 2.0,
) -> dict[str, Any]:
    """Drive the server at `url` (process `pid`); bank `load` is created here. RSS is read
    after the first `warmup` of the run, under load, and again `settle` seconds after the load
    stops: by then the server has given its free heap pages back (`TRIM_EVERY_S` in
    vqsearch/service/_observe.py), so the second figure is memory it still holds."""
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((NB, D)).astype(np.float32)
    async with AsyncClient(url, timeout=60, retries=0) as c:
        await c.create_bank("load", codebook)
    lat: dict[str, list[float]] = {"search": [], "nearest": [], "add": []}
    errors: list[str] = []
    stop_at = time.monotonic() + seconds
    warm_at = time.monotonic() + warmup * seconds
    rss: dict[str, float] = {}

    async def worker(w: int) -> None:
        r = np.random.default_rng(w)
        async with AsyncClient(url, timeout=60, retries=0) as c:
            n = 0
            while time.monotonic() < stop_at:
                kind = ("search", "nearest", "nearest", "add")[n % 4] if w % 8 else "search"
                q = r.standard_normal((int(r.integers(1, 65)), D)).astype(np.float32)
                t0 = time.perf_counter()
                try:
                    if kind == "search":
                        await c.search("load", q, k=10)
                    elif kind == "nearest":
                        await c.nearest("load", q.reshape(-1, 1, D))
                    else:
                        await c.add("load", q[:4])
                except VQSearchClientError as exc:
                    errors.append(f"{kind}: {exc}")
                lat[kind].append(time.perf_counter() - t0)
                n += 1

    async def sample_rss() -> None:
        await asyncio.sleep(max(0.0, warm_at - time.monotonic()))
        rss["after_warmup"] = rss_mb(pid)

    t0 = time.monotonic()
    await asyncio.gather(sample_rss(), *(worker(w) for w in range(clients)))
    elapsed = time.monotonic() - t0
    await asyncio.sleep(settle)
    rss["end"] = rss_mb(pid)
    every = np.array([x for v in lat.values() for x in v])
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": len(every),
        "throughput_rps": round(len(every) / elapsed, 1),
        "p50_ms": round(1e3 * float(np.percentile(every, 50)), 2),
        "p99_ms": round(1e3 * float(np.percentile(every, 99)), 2),
        "by_kind": {
            k: {"n": len(v), "p99_ms": round(1e3 * float(np.percentile(v, 99)), 2)}
            for k, v in lat.items()
            if v
        },
        "errors": len(errors),
        "first_errors": errors[:5],
        "rss_mb_after_warmup": round(rss["after_warmup"], 1),
        "rss_mb_end": round(rss["end"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load.md")
    args = ap.parse_args()
    port = 18000 + os.getpid() % 1000
    with tempfile.TemporaryDirectory() as data:
        proc = serve(data, port, VQSEARCH_MAX_INFLIGHT="256")
        try:
            report = asyncio.run(
                run(f"http://127.0.0.1:{port}", proc.pid, args.clients, args.seconds)
            )
        finally:
            proc.terminate()
            proc.wait(60)
    lines = [
        f"# load: {args.clients} clients, {args.seconds:.0f} s, loopback, 2 cores",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in report.items()],
    ]
    print("\n".join(lines))
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
