"""How cost grows with the bank: clustered 128-d banks of 1M, 4M and 16M vectors, each built
through HTTP by a real server on 127.0.0.1 (its own data dir), indexed with the default spec,
and searched exactly and approximately. Per size: load rate, index build time, server memory
(resident and anonymous) and bytes on disk, exact and approximate time for 1000 queries in one
request and for single queries, and 10-recall@10 against the exact answers of the same run.

    python bench/scale.py [--sizes 1000000 4000000 16000000] [--out bench/results/scale.md]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _machine import cpu  # bench/ is on sys.path when run as a script
from load import serve

from vqsearch.index import k_recall_at_k

D, CHUNK, CENTERS, NQ, K = 128, 65536, 1024, 1000, 10
NPY = {"content-type": "application/x-npy", "accept": "application/x-npz"}


def clustered(seed: int, n: int) -> np.ndarray:
    """n points around 1024 fixed centres (N(0, 1) each), spread 0.5 per dimension."""
    centers = np.random.default_rng(7).standard_normal((CENTERS, D), dtype=np.float32)
    rng = np.random.default_rng(seed)
    x = centers[rng.integers(0, CENTERS, n)]
    x += 0.5 * rng.standard_normal((n, D), dtype=np.float32)
    return x


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def memory(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(line.split()[1]) / 1024
    return out


def search(c: httpx.Client, xq: np.ndarray, **params: Any) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    r = c.post("/v1/banks/s/search", params={"k": K, **params}, content=npy(xq), headers=NPY)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return np.load(io.BytesIO(r.content))["ids"], dt


def single_ms(c: httpx.Client, xq: np.ndarray, **params: Any) -> float:
    return 1000 * statistics.median(search(c, xq[i : i + 1], **params)[1] for i in range(20))


def measure(n: int, port: int) -> dict[str, Any]:
    data = tempfile.mkdtemp(prefix="vqsearch-scale-")
    env = {"VQSEARCH_MAX_BANK_VECTORS": str(n), "VQSEARCH_AUTO_REBUILD": "0"}
    proc = serve(data, port, **env)
    row: dict[str, Any] = {"n": n}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=3600) as c:
            c.put(f"/v1/banks/s?d={D}").raise_for_status()
            t0 = time.perf_counter()
            for i, a in enumerate(range(0, n, CHUNK)):
                body = npy(clustered(1000 + i, min(CHUNK, n - a)))
                c.post("/v1/banks/s/vectors", content=body, headers=NPY).raise_for_status()
            row["load_s"] = time.perf_counter() - t0
            row["load_rate"] = n / row["load_s"]
            info = c.get("/v1/banks/s").json()
            row["disk_bytes"], row["mem_loaded"] = info["bytes_on_disk"], memory(proc.pid)

            t0 = time.perf_counter()
            c.put("/v1/banks/s/index").raise_for_status()
            while (index := c.get("/v1/banks/s").json()["index"])["state"] not in (
                "ready",
                "failed",
            ):
                time.sleep(0.5)
            assert index["state"] == "ready", index
            row["build_s"] = time.perf_counter() - t0
            row["spec"], row["index_bytes"] = index["spec"], index["bytes"]
            row["mem_indexed"] = memory(proc.pid)

            xq = clustered(99, NQ)
            gt, row["exact_s"] = search(c, xq)
            row["exact_single_ms"] = single_ms(c, xq)
            nlist = int(index["nlist"] or 1)
            row["approx"] = []
            for nprobe, k_factor in ((max(1, nlist // 32), 4), (max(1, nlist // 8), 16)):
                p = {"mode": "approx", "nprobe": nprobe, "k_factor": k_factor}
                ids, dt = search(c, xq, **p)
                row["approx"].append(
                    {
                        "nprobe": nprobe,
                        "k_factor": k_factor,
                        "s": dt,
                        "single_ms": single_ms(c, xq, **p),
                        "recall_10_at_10": k_recall_at_k(ids, gt),
                    }
                )
            row["mem_end"] = memory(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(data, ignore_errors=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| vectors | load (vectors/s) | on disk | index | index RAM | build | anonymous memory "
        "loaded / indexed / end | exact 1000 q | exact 1 q | approx 1000 q | approx 1 q "
        "| 10-recall@10 | exact / approx (1000 q) |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        anon = " / ".join(
            f"{r[k]['RssAnon']:.0f}" for k in ("mem_loaded", "mem_indexed", "mem_end")
        )
        for a in r["approx"]:
            lines.append(
                f"| {r['n']:,} | {r['load_rate']:,.0f} | {r['disk_bytes'] / 2**30:.2f} GiB "
                f"| {r['spec']} | {r['index_bytes'] / 2**20:.0f} MiB | {r['build_s']:.0f} s "
                f"| {anon} MiB | {r['exact_s']:.2f} s | {r['exact_single_ms']:.0f} ms "
                f"| nprobe={a['nprobe']}, k_factor={a['k_factor']}: {a['s']:.3f} s "
                f"| {a['single_ms']:.1f} ms | {a['recall_10_at_10']:.3f} "
                f"| {r['exact_s'] / a['s']:.1f}x |"
            )
    return "\n".join(lines)


NOTE = (
    "Anonymous memory is the server's own (RssAnon: what the kernel cannot evict); its resident "
    "set also counts the bank's pages mapped from the page cache, which the kernel reclaims "
    "under pressure (the JSON file has both). On disk counts every file of the bank when "
    "loading ended, a compaction's part file included when one was under way."
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    ap.add_argument("--out", type=Path, default=Path("bench/results/scale.md"))
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--render", action="store_true", help="rewrite OUT.md from OUT.json only")
    args = ap.parse_args()
    if args.render:
        doc = json.loads(args.out.with_suffix(".json").read_text())
        rows, machine = doc["rows"], doc["cpu"]
    else:
        rows, machine = [], cpu()
        for n in args.sizes:
            rows.append(measure(n, args.port))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    text = (
        "# Bank size against cost (`python bench/scale.py`)\n\n"
        f"CPU: {machine}. One server on 127.0.0.1, one client on the same cores; clustered data "
        f"(1024 centres, d={D}), {NQ} held-out queries from the same distribution, k={K}. "
        "Loaded in appends of 65536 rows (`.npy` bodies); default index spec (codes only, "
        "re-ranked from the bank's rows). Recall is against the exact answers of the same run; "
        "the page cache held the whole bank (no memory limit here: see "
        "tests/service/test_beyond_memory.py for a bank twice its server's memory).\n\n"
        + table(rows)
        + "\n\n"
        + NOTE
        + "\n"
    )
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"cpu": machine, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
