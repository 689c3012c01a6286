"""What Ray costs on one host, against vqsearch without Ray in the same run, on a real cluster
of this machine (a head with no CPUs and two worker nodes of 1 CPU, `ray.cluster_utils`):

1. exact top-10 of 1000 queries from the data on a 2,000,000 x 128 clustered bank: its two
   shards on the two nodes (`RayShards`) against the bank searched whole in process;
2. HTTP: `vqsearch serve --ray` on a 16384 x 256 codebook made with `?shards=2` against plain
   `vqsearch serve`: 64 clients sending one vector at a time, and 4096-row batches;
3. `vqsearch tokenize` of files of latents, on Ray Data and in process, against `nearest` on
   the same arrays in process (vectors/s).

Ray needs a network of loopback only here (see tests/ray/conftest.py): as root the script runs
itself in a network namespace of its own.

    python bench/ray_cluster.py [--rows 2000000] [--seconds 10] [--out bench/results/ray_cluster.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import cpu  # bench/ is on sys.path when run as a script
from load import serve
from serving import NB as CN
from serving import D as CD
from serving import best, singles

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


def http(tmp: Path, address: str, seconds: float, rng: np.random.Generator) -> list[str]:
    codebook = rng.standard_normal((CN, CD)).astype(np.float32)
    xq = (codebook[rng.integers(0, CN, 4096)] + 0.1 * rng.standard_normal((4096, CD))).astype(
        np.float32
    )
    env = {"VQSEARCH_MAX_INFLIGHT": "1024", "VQSEARCH_AUTO_REBUILD": "0", "VQSEARCH_DEVICE": "cpu"}
    urls = {}
    with contextlib.ExitStack() as stack:
        for name, port, args, shards in (
            ("plain", 18700, [], 1),
            ("ray", 18701, ["--ray", address], 2),
        ):
            proc = serve(str(tmp / name), port, args, **env)
            stack.callback(proc.wait, 60)
            stack.callback(proc.terminate)
            urls[name] = f"http://127.0.0.1:{port}"
            with Client(urls[name], timeout=120) as c:
                c.create_bank("cb", codebook, shards=shards)
                assert c.get_bank("cb").shards == shards
        one: dict[str, list[float]] = {n: [] for n in urls}
        big: dict[str, list[float]] = {n: [] for n in urls}
        for _ in range(2):
            for name, url in urls.items():
                one[name].append(asyncio.run(singles(url, 64, seconds, codebook)))
                big[name].append(asyncio.run(batches(url, seconds, xq)))
                print(name, one[name][-1], big[name][-1], flush=True)
    o = {n: max(v) for n, v in one.items()}
    b = {n: max(v) for n, v in big.items()}
    return [
        f"## HTTP, `nearest` on a {CN} x {CD} codebook, {seconds:.0f} s per run, best of 2 rounds",
        "",
        "| load | plain `vqsearch serve` | `--ray`, `?shards=2` | ray / plain |",
        "|---|---|---|---|",
        f"| 64 clients, 1 vector each (requests/s) | {o['plain']:.0f} | {o['ray']:.0f} | "
        f"{o['ray'] / o['plain']:.2f} |",
        f"| 2 clients, 4096-row batches (rows/s) | {b['plain']:.0f} | {b['ray']:.0f} | "
        f"{b['ray'] / b['plain']:.2f} |",
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
