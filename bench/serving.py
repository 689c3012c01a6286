"""Serving costs, measured against a real server on 127.0.0.1 in the same run:

1. micro-batching: 64 concurrent clients each sending one vector at a time to `nearest` on a
   16384 x 256 codebook, with batching on (VQSEARCH_BATCH_MAX_ROWS=4096) and off (0);
2. transport: 8192 x 256 queries (k=1) end to end over HTTP, binary (.npy) and JSON, against
   the same search in process.

    python bench/serving.py [--seconds 15] [--rounds 3] [--out bench/results/serving.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from load import serve  # bench/ is on sys.path when run as a script

from vqsearch.client import AsyncClient, Client
from vqsearch.index import Bank

NB, D = 16384, 256


async def singles(url: str, clients: int, seconds: float, codebook: np.ndarray) -> float:
    """Requests per second of `clients` loops each sending one vector at a time."""
    stop = time.monotonic() + seconds
    done = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def loop(c: AsyncClient, w: int) -> None:
        nonlocal done
        rng = np.random.default_rng(w)
        while time.monotonic() < stop:
            z = codebook[rng.integers(NB)] + 0.1 * rng.standard_normal(D).astype(np.float32)
            await c.nearest("cb", z[None])
            done += 1

    async with AsyncClient(url, timeout=60, retries=0) as c:
        c._http = httpx.AsyncClient(base_url=url, timeout=60, limits=limits)
        t0 = time.monotonic()
        await asyncio.gather(*(loop(c, w) for w in range(clients)))
        return done / (time.monotonic() - t0)


def wrk_singles(url: str, clients: int, seconds: float, codebook: np.ndarray, tmp: str) -> float:
    """The same load from wrk (C, a second process): the Python load generator's own cost
    (httpx's pool bookkeeping with 64 connections) would otherwise cap what is measured."""
    body = Path(tmp) / "one.npy"
    np.save(body, (codebook[:1] + 0.1).astype(np.float32))
    script = Path(tmp) / "post.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/x-npy"\n'
        f'wrk.body = io.open("{body}", "rb"):read("*all")\n'
    )
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{clients}",
            f"-d{int(seconds)}s",
            "-s",
            str(script),
            f"{url}/v1/banks/cb/nearest",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(out)
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def best(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serving.md")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((NB, D)).astype(np.float32)
    lines = ["# serving on 127.0.0.1 (2 cores; load generator on the same machine)", ""]
    servers: dict[str, tuple[str, str]] = {}
    with contextlib.ExitStack() as stack:
        # Both servers stay up and the rounds alternate on, off, on, off...: this machine's
        # throughput drifts by 10-20% within minutes, and a round pairs like with like.
        for name, rows in (("batching on", "4096"), ("batching off", "0")):
            data = stack.enter_context(tempfile.TemporaryDirectory())
            port = 18500 + len(servers)
            proc = serve(
                data,
                port,
                VQSEARCH_BATCH_MAX_ROWS=rows,
                VQSEARCH_MAX_INFLIGHT="1024",
                VQSEARCH_AUTO_REBUILD="0",  # no index build competing for the cores
            )
            stack.callback(proc.wait, 60)
            stack.callback(proc.terminate)
            url = f"http://127.0.0.1:{port}"
            with Client(url) as c:
                c.create_bank("cb", codebook)
            servers[name] = (url, data)
        rps: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, (url, data) in servers.items():
                if shutil.which("wrk"):
                    r = wrk_singles(url, args.clients, args.seconds, codebook, data)
                else:
                    r = asyncio.run(singles(url, args.clients, args.seconds, codebook))
                rps[name].append(r)
                print(f"{name}: {r:.0f} requests/s", flush=True)
    ratios = [a / b for a, b in zip(rps["batching on"], rps["batching off"], strict=True)]
    lines += [
        f"## {args.clients} clients, one vector per request, `nearest`, {NB}x{D} codebook, "
        f"{args.seconds:.0f} s per run, {args.rounds} rounds",
        "",
        "| round | batching on (requests/s) | batching off (requests/s) | on / off |",
        "|---|---|---|---|",
        *[
            f"| {i + 1} | {a:.0f} | {b:.0f} | {a / b:.2f} |"
            for i, (a, b) in enumerate(zip(rps["batching on"], rps["batching off"], strict=True))
        ],
        "",
        f"batching on / off, median of the rounds: **{float(np.median(ratios)):.2f}x**",
        "",
    ]

    xq = (codebook[rng.integers(0, NB, 8192)] + 0.1 * rng.standard_normal((8192, D))).astype(
        np.float32
    )
    bank = Bank(D)
    bank.add(codebook)
    with tempfile.TemporaryDirectory() as data:
        proc = serve(
            data,
            18600,
            VQSEARCH_DEVICE="cpu",
            VQSEARCH_MAX_BODY_BYTES=str(1 << 30),
            VQSEARCH_MAX_INFLIGHT="1024",
            VQSEARCH_AUTO_REBUILD="0",
        )
        try:
            url = "http://127.0.0.1:18600"
            with Client(url, timeout=300, chunk_size=1 << 20) as c:
                c.create_bank("cb", codebook)
                # alternated, 7 rounds: a noisy neighbour hurts both alike
                pairs = []
                for _ in range(7):
                    local = best(lambda: bank.search(xq, 1, device="cpu"), 1)
                    pairs.append((local, best(lambda: c.search("cb", xq, k=1), 1)))
                t_local, t_npy = (min(v) for v in zip(*pairs, strict=True))
                ratio = float(np.median([h / lo for lo, h in pairs]))
            with Client(url, timeout=300, chunk_size=1 << 20, binary=False) as j:
                t_json = best(lambda: j.search("cb", xq, k=1), repeats=2)
        finally:
            proc.terminate()
            proc.wait(60)
    lines += [
        "## 8192 x 256 queries, k=1, end to end against in process",
        "",
        "| path | seconds | / in process |",
        "|---|---|---|",
        f"| in process (Bank.search) | {t_local:.3f} | 1.00 |",
        f"| HTTP, .npy / .npz | {t_npy:.3f} | {t_npy / t_local:.2f} |",
        f"| HTTP, JSON | {t_json:.3f} | {t_json / t_local:.2f} |",
        "",
        f"Best times of 7 alternated rounds (JSON: of 2). HTTP .npy / in process, median of the "
        f"rounds' ratios: **{ratio:.2f}x** (per round: "
        + ", ".join(f"{h / lo:.2f}" for lo, h in pairs)
        + ").",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
