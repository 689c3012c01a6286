"""What Ray costs on one host, against vqsearch without Ray in the same run, on a real cluster
of this machine (a head with no CPUs and two worker nodes of 1 CPU, `ray.cluster_utils`):

1. exact top-10 of 1000 queries from the data on a 2,000,000 x 128 clustered bank: its two
   shards on the two nodes (`RayShards`) against the bank searched whole in process;
2. HTTP on a 16384 x 256 codebook against plain `vqsearch serve`: `--ray` with the bank made
   `?shards=2`, Ray Serve replicas of the API (`VQSEARCH_RAY_REPLICAS=2`), and, for 1-vector
   requests, a bare `@serve.batch` deployment (Serve's batching against the service's);
   64 clients sending one vector at a time, and 4096-row batches;
3. `vqsearch tokenize` of files of latents, on Ray Data and in process, against `nearest` on
   the same arrays in process (vectors/s).

Ray needs a network of loopback only here (see tests/ray/conftest.py): as root the script runs
itself in a network namespace of its own.

    python bench/ray_cluster.py [--rows 2000000] [--seconds 10] [--out bench/results/ray_cluster.md]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _machine import cpu  # bench/ is on sys.path when run as a script
from load import serve as start_server
from serving import NB as CN
from serving import D as CD
from serving import best

from vqsearch.__main__ import main as cli
from vqsearch.client import AsyncClient, Client
from vqsearch.index import Bank, Queries

D, NQ, K = 128, 1000, 10


def loopback_only() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 53))
        except OSError:
            return True
        return s.getsockname()[0].startswith("127.")


def clustered(rng: np.random.Generator, n: int, d: int, centres: int = 1024) -> np.ndarray:
    c = rng.standard_normal((centres, d)).astype(np.float32) * 2
    out = np.empty((n, d), np.float32)
    for i in range(0, n, 1 << 18):
        m = min(n - i, 1 << 18)
        out[i : i + m] = c[rng.integers(0, centres, m)] + rng.standard_normal((m, d))
    return out


async def batches(url: str, seconds: float, xq: np.ndarray, clients: int = 2) -> float:
    """Rows per second of `clients` loops each sending 4096-row `nearest` requests."""
    stop, done = time.monotonic() + seconds, 0

    async def loop(c: AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < stop:
            await c.nearest("cb", xq)
            done += len(xq)

    async with AsyncClient(url, timeout=120, retries=0) as c:
        t0 = time.monotonic()
        await asyncio.gather(*(loop(c) for _ in range(clients)))
        return done / (time.monotonic() - t0)


def sharded_search(tmp: Path, rows: int, rng: np.random.Generator) -> list[str]:
    from vqsearch.ray import RayShards

    xb = clustered(rng, rows, D)
    xq = xb[rng.integers(0, rows, NQ)] + 0.1 * rng.standard_normal((NQ, D)).astype(np.float32)
    bank = Bank.create(tmp / "big", D, "l2")
    for i in range(0, rows, 1 << 20):
        bank.add(xb[i : i + (1 << 20)])
    del xb
    shards = RayShards(tmp / "big", 2, "l2", timeout=600)
    try:
        q = Queries.of(xq, D, "l2")
        shards.search(q, K, lambda: bank.version)  # warm: the shards load their rows
        pairs = []
        for _ in range(3):  # alternated: drift on this machine hits both alike
            whole = best(lambda: bank.search(xq, K, device="cpu"), 1)
            pairs.append((whole, best(lambda: shards.search(q, K, lambda: bank.version), 1)))
        Dw, Iw = bank.search(xq, K, device="cpu")
        Ds, Is = shards.search(q, K, lambda: bank.version)
        assert (Is == Iw).all() and (Ds == Dw).all(), "sharded answers differ"
    finally:
        shards.close()
    tw, ts = (min(v) for v in zip(*pairs, strict=True))
    return [
        f"## exact top-{K}, {NQ} queries, {rows:,} x {D} clustered bank",
        "",
        "| search | seconds | / whole |",
        "|---|---|---|",
        f"| whole, in process (2 threads) | {tw:.3f} | 1.00 |",
        f"| 2 shards on 2 nodes (1 CPU each) | {ts:.3f} | {ts / tw:.2f} |",
        "",
        "Best of 3 alternated rounds; per round sharded / whole: "
        + ", ".join(f"{s / w:.2f}" for w, s in pairs)
        + ". Answers equal (ids and distances).",
        "",
    ]


async def json_singles(url: str, clients: int, seconds: float, codebook: np.ndarray) -> float:
    """Requests per second of `clients` loops each POSTing one vector as JSON to `nearest`
    (the one request every server measured here takes alike, @serve.batch's included)."""
    stop, done = time.monotonic() + seconds, 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def loop(c: httpx.AsyncClient, w: int) -> None:
        nonlocal done
        rng = np.random.default_rng(w)
        while time.monotonic() < stop:
            z = codebook[rng.integers(CN)] + 0.1 * rng.standard_normal(CD).astype(np.float32)
            r = await c.post("/v1/banks/cb/nearest", json={"queries": [z.tolist()]})
            r.raise_for_status()
            done += 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        t0 = time.monotonic()
        await asyncio.gather(*(loop(c, w) for w in range(clients)))
        return done / (time.monotonic() - t0)


def serve_batch_app(data: Path, replicas: int) -> Any:
    """The alternative to the service's micro-batching: Ray Serve's own `@serve.batch` over
    the same bank, `replicas` replicas of 1 CPU, the same JSON in and out (nothing else)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=replicas, max_ongoing_requests=1024)
    class Batched:
        def __init__(self, path: str) -> None:
            self.bank = Bank.open(Path(path), writable=False)

        @serve.batch(max_batch_size=4096, batch_wait_timeout_s=0.002)
        async def nearest(self, rows: list[np.ndarray]) -> list[np.ndarray]:
            xq = np.concatenate(rows)
            _, I = await asyncio.to_thread(self.bank.search, xq, 1, device="cpu")
            return np.split(I[:, 0], np.cumsum([len(r) for r in rows])[:-1])

        async def __call__(self, request: Request) -> JSONResponse:
            xq = np.asarray((await request.json())["queries"], np.float32)
            return JSONResponse({"codes": (await self.nearest(xq)).tolist()})

    return Batched.bind(str(data / "banks" / "cb"))


def http(tmp: Path, address: str, seconds: float, rng: np.random.Generator) -> list[str]:
    """One server at a time (the shards and the replicas share the two CPUs of the cluster),
    each measured twice, best kept."""
    from ray import serve

    codebook = rng.standard_normal((CN, CD)).astype(np.float32)
    xq = (codebook[rng.integers(0, CN, 4096)] + 0.1 * rng.standard_normal((4096, CD))).astype(
        np.float32
    )
    env = {"VQSEARCH_MAX_INFLIGHT": "1024", "VQSEARCH_AUTO_REBUILD": "0", "VQSEARCH_DEVICE": "cpu"}
    replicas = {"VQSEARCH_RAY_REPLICAS": "2", "VQSEARCH_RAY_REPLICA_CPUS": "1"}
    one: dict[str, float] = {}
    big: dict[str, float] = {}
    rows = (
        ("plain", 18700, [], 1, {}),
        ("ray", 18701, ["--ray", address], 2, {}),
        ("replicas", 18702, ["--ray", address], 1, replicas),
    )
    for name, port, args, shards, extra in rows:
        proc = start_server(str(tmp / name), port, args, **env, **extra)
        try:
            url = f"http://127.0.0.1:{port}"
            with Client(url, timeout=120) as c:
                c.create_bank("cb", codebook, shards=shards)
                assert c.get_bank("cb").shards == shards
            one[name] = max(asyncio.run(json_singles(url, 64, seconds, codebook)) for _ in "ab")
            big[name] = max(asyncio.run(batches(url, seconds, xq)) for _ in "ab")
            print(name, one[name], big[name], flush=True)
        finally:
            proc.terminate()
            proc.wait(120)
    # the same bank (the plain server's data dir, closed now) behind @serve.batch replicas
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": 18703})
    try:
        serve.run(serve_batch_app(tmp / "plain", 2), name="batch", route_prefix="/")
        url = "http://127.0.0.1:18703"
        one["batch"] = max(asyncio.run(json_singles(url, 64, seconds, codebook)) for _ in "ab")
        print("batch", one["batch"], flush=True)
    finally:
        serve.shutdown()
    o, b = one, big
    return [
        f"## HTTP, `nearest` on a {CN} x {CD} codebook, {seconds:.0f} s per run, best of 2",
        "",
        "Servers: plain `vqsearch serve`; `--ray` with the bank made `?shards=2` (2 shard "
        "actors, 1 CPU each); `VQSEARCH_RAY_REPLICAS=2` (2 Ray Serve replicas of the HTTP "
        "API, 1 CPU each, the service's micro-batching, a writer deployment behind them); and "
        "2 replicas of a bare Ray Serve deployment batching with `@serve.batch` (max 4096 "
        "rows, 2 ms) over the same bank. One vector a request, as JSON, from 64 clients.",
        "",
        "| load | plain | `--ray` shards=2 | Serve replicas | `@serve.batch` |",
        "|---|---|---|---|---|",
        f"| 64 clients x 1 vector (requests/s) | {o['plain']:.0f} | {o['ray']:.0f} "
        f"({o['ray'] / o['plain']:.2f}x) | {o['replicas']:.0f} "
        f"({o['replicas'] / o['plain']:.2f}x) | {o['batch']:.0f} "
        f"({o['batch'] / o['plain']:.2f}x) |",
        f"| 2 clients x 4096 rows (rows/s) | {b['plain']:.0f} | {b['ray']:.0f} "
        f"({b['ray'] / b['plain']:.2f}x) | {b['replicas']:.0f} "
        f"({b['replicas'] / b['plain']:.2f}x) | |",
        "",
    ]


def tokenize(tmp: Path, address: str, rng: np.random.Generator) -> list[str]:
    codebook = rng.standard_normal((CN, CD)).astype(np.float32)
    bank = Bank.create(tmp / "tok" / "banks" / "cb", CD, "l2")
    bank.add(codebook)
    src = tmp / "latents"
    src.mkdir()
    arrays = []
    for i in range(4):
        z = codebook[rng.integers(0, CN, 32768)] + 0.1 * rng.standard_normal((32768, CD))
        arrays.append(z.astype(np.float32))
        np.save(src / f"{i}.npy", arrays[-1])
    n = sum(len(z) for z in arrays)
    t_nearest = best(lambda: [bank.search(z, 1, device="cpu") for z in arrays], 1)
    common = ["tokenize", "--bank", "cb", "--input", str(src), "--data-dir", str(tmp / "tok")]
    t0 = time.perf_counter()
    assert cli([*common, "--output", str(tmp / "out-local")]) == 0
    t_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert cli([*common, "--output", str(tmp / "out-ray"), "--ray", address]) == 0
    t_ray = time.perf_counter() - t0
    for i in range(4):
        a, b = np.load(tmp / "out-local" / f"{i}.npy"), np.load(tmp / "out-ray" / f"{i}.npy")
        assert (a == b).all()
    rate = {k: n / t for k, t in (("n", t_nearest), ("l", t_local), ("r", t_ray))}
    return [
        f"## tokenize, 4 files of 32768 x {CD} latents, {CN}-code codebook",
        "",
        "| path | vectors/s | / nearest in process |",
        "|---|---|---|",
        f"| `Bank.search(z, 1)` in process | {rate['n']:,.0f} | 1.00 |",
        f"| `vqsearch tokenize` in process | {rate['l']:,.0f} | {rate['l'] / rate['n']:.2f} |",
        f"| `vqsearch tokenize --ray` (2 nodes, 1 CPU each) | {rate['r']:,.0f} | "
        f"{rate['r'] / rate['n']:.2f} |",
        "",
        "The Ray run includes starting its actor pool (each opens the bank once).",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument(
        "--only",
        nargs="+",
        choices=["search", "http", "tokenize"],
        default=None,
        help="run these parts only (default: all)",
    )
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "ray_cluster.md"
    )
    args = ap.parse_args()
    if not loopback_only():
        if os.geteuid() != 0:
            sys.exit(
                "bench/ray_cluster.py needs a network namespace with loopback only (run as root)"
            )
        cmd = " ".join([sys.executable, *map(repr, sys.argv)])
        os.execvp("unshare", ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {cmd}"])
    import ray
    from ray.cluster_utils import Cluster

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="vqray", dir="/tmp") as t:
        tmp = Path(t)
        os.environ["RAY_TMPDIR"] = t
        (tmp / "ray").mkdir()
        node = {"node_ip_address": "127.0.0.1", "temp_dir": t}
        c = Cluster(True, head_node_args={**node, "num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(2):
                c.add_node(**node, num_cpus=1)
            c.wait_for_nodes()
            ray.init(address=c.address, logging_level=logging.WARNING, log_to_driver=False)
            lines = [f"# vqsearch on Ray, one host: {cpu()}", ""]
            parts = args.only or ["search", "http", "tokenize"]
            if "search" in parts:
                lines += sharded_search(tmp, args.rows, rng)
            if "http" in parts:
                lines += http(tmp, c.address, args.seconds, rng)
            if "tokenize" in parts:
                lines += tokenize(tmp, c.address, rng)
        finally:
            ray.shutdown()
            c.shutdown()
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
