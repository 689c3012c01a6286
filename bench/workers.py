"""Memory of several uvicorn workers over one data dir, against one worker, in the same run.

A primary writes two banks (a 16384 x 256 codebook and a 1,000,000 x 128 bank: 512 MB of float32
on disk); then read-only servers with 1 and with 4 workers serve them, every worker warmed by
concurrent searches of both banks. Per worker: RSS, PSS (shared pages split between the
processes that map them) and the part of RSS that is the banks' memory-mapped files. The
segment files are mapped, not read: N workers share one copy in the page cache. What each
worker adds is its own: Python, torch, and the per-bank prepared copy of small banks
(vqsearch/index/_rows.py: centred/bf16 rows kept when under 256 MiB) plus search scratch.

    python bench/workers.py [--out bench/results/workers.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from load import serve  # bench/ is on sys.path when run as a script

from vqsearch.client import AsyncClient, Client

BANKS = {"cb": (16384, 256), "big": (1_000_000, 128)}


def memory_kb(pid: int, data: str) -> dict[str, int]:
    """RSS, PSS, and the RSS of mappings of files under `data`, in kB."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    out = {
        k: int(line.split()[1])
        for line in rollup
        for k in ("Rss", "Pss")
        if line.startswith(k + ":")
    }
    mapped, in_data = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if "-" in line.split(" ")[0] and len(line.split()) >= 5:  # a mapping's header line
            in_data = data in line
        elif in_data and line.startswith("Rss:"):
            mapped += int(line.split()[1])
    out["banks"] = mapped
    return out


def workers_of(pid: int) -> list[int]:
    """uvicorn's worker processes (spawned children; not multiprocessing's resource tracker)."""
    kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


async def warm(url: str, seconds: float, clients: int = 16) -> int:
    """Concurrent searches of both banks so that every worker serves some; returns requests."""
    rng = np.random.default_rng(0)
    stop, done = time.monotonic() + seconds, 0

    async def loop(c: AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < stop:
            await c.nearest("cb", rng.standard_normal((64, 256)).astype(np.float32))
            await c.search("big", rng.standard_normal((16, 128)).astype(np.float32), k=10)
            done += 2

    async with AsyncClient(url, timeout=120) as c:
        # a new connection per request: the kernel hands each to whichever worker accepts it
        c._http = httpx.AsyncClient(
            base_url=url, timeout=120, limits=httpx.Limits(max_keepalive_connections=0)
        )
        await asyncio.gather(*(loop(c) for _ in range(clients)))
    return done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "workers.md")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    lines = [
        f"# uvicorn workers over one data dir ({os.cpu_count()} cores)",
        "",
        "Banks: "
        + ", ".join(f"`{n}` {nb}x{d}" for n, (nb, d) in BANKS.items())
        + f"; each server warmed by {args.seconds:.0f} s of concurrent searches of both.",
        "",
        "| workers | requests/s | RSS per worker (MB) | RSS, all workers (MB) "
        "| PSS, all workers (MB) | bank files in each worker's RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as data:
        proc = serve(data, 18800)
        try:
            with Client("http://127.0.0.1:18800", timeout=600) as c:
                for name, (nb, d) in BANKS.items():
                    xb = rng.standard_normal((nb, d)).astype(np.float32)
                    c.create_bank(name, xb[: min(nb, 200_000)])
                    for i0 in range(200_000, nb, 200_000):
                        c.add(name, xb[i0 : i0 + 200_000])
        finally:
            proc.terminate()
            proc.wait(60)
        for workers in (1, 4):
            port = 18810 + workers
            proc = serve(data, port, VQSEARCH_READ_ONLY="1", args=["--workers", str(workers)])
            try:
                n = asyncio.run(warm(f"http://127.0.0.1:{port}", args.seconds))
                pids = workers_of(proc.pid) if workers > 1 else [proc.pid]
                mem = [memory_kb(p, data) for p in pids]
            finally:
                proc.terminate()
                proc.wait(60)
            rss = [m["Rss"] / 1024 for m in mem]
            row = (
                f"| {workers} | {n / args.seconds:.0f} | "
                + " / ".join(f"{r:.0f}" for r in rss)
                + f" | {sum(rss):.0f} | {sum(m['Pss'] for m in mem) / 1024:.0f} | "
                + " / ".join(f"{m['banks'] / 1024:.0f}" for m in mem)
                + " |"
            )
            print(row, flush=True)
            lines.append(row)
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
