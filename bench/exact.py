"""Exact search: our `knn` against faiss `IndexFlatL2`, measured in the same run.

Per case: the best-of-N wall time of faiss, of ours with fp32 candidates and of ours with the
default ('auto': for k = 1 bf16 candidates where the CPU runs bf16 natively, int8 on other
CPUs); the ratio ours / faiss (<= 1.0: at least as fast); the GFLOP/s achieved (2 nq nb d /
time) next to the machine's fp32, bf16 and int8 GEMM rates measured at the start of the run;
how many queries the first scan proved (the rest were scanned again, see
vqsearch/index/_exact.py); and how many ids differ from faiss (faiss is float32 and not
tie-exact; ours equal float64 brute force, see tests/).
Timings alternate faiss / ours / ours so that a noisy neighbour hurts both alike.

    python bench/exact.py [--repeats 5] [--out bench/results/exact.md]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import faiss
import numpy as np
import torch
from _machine import cpu  # bench/ is on sys.path when run as a script
from faiss.contrib.datasets import SyntheticDataset

from vqsearch.index import knn

CASES = [
    # name, nb, d, nq, k, data
    ("codebook 16384x256, 16384 queries, k=1", 16384, 256, 16384, 1, "code+noise"),
    ("k-means codebook 4096x256, 16384 queries, k=1", 4096, 256, 16384, 1, "kmeans"),
    # trained codebooks of other shapes: what VQ tokenizers hold, queries from the data
    ("k-means codebook 1024x64, 16384 queries, k=1", 1024, 64, 16384, 1, "kmeans"),
    ("k-means codebook 1024x768, 16384 queries, k=1", 1024, 768, 16384, 1, "kmeans"),
    ("k-means codebook 16384x256, 16384 queries, k=1", 16384, 256, 16384, 1, "kmeans"),
    ("bank 200000x128, 1000 queries, k=10", 200_000, 128, 1000, 10, "code+noise"),
    ("bank 1000000x128, 1000 queries, k=10", 1_000_000, 128, 1000, 10, "code+noise"),
]


def gemm_rate(dtype: torch.dtype, repeats: int = 5) -> float:
    """Best GFLOP/s of a 4096 x 4096 x 256 torch GEMM (the shape of a scan tile)."""
    a = torch.randn(4096, 256).to(dtype)
    b = torch.randn(4096, 256).to(dtype)
    out = torch.empty(4096, 4096, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch.mm(a, b.T, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096 * 4096 * 256 / best / 1e9


def int8_rate(repeats: int = 5) -> float:
    """Best GOP/s of oneDNN's u8 x s8 GEMM (fp32 out) at 2048 x 1024 x 256, the int8 scan's tile."""
    from vqsearch.index import _int8

    if not _int8.supported(torch.device("cpu"), 1, 1):
        return float("nan")
    q = torch.randint(1, 128, (2048, 256), dtype=torch.uint8)
    w = _int8._pack(torch.randint(-127, 128, (1024, 256)))
    s = torch.ones(1024)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        _int8._scores(q, 1.0, w, s, None)
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 * 1024 * 256 / best / 1e9


def data(kind: str, nb: int, d: int, nq: int, rng: np.random.Generator):
    """(xb, xq). code+noise: queries are bank rows plus noise (a clear nearest row).
    kmeans: a codebook trained by k-means on structured data, queries fresh from that data
    (what a VQ tokenizer sees: nearest codes can be close to each other)."""
    if kind == "kmeans":
        # 40 training points a code, at most 2**17 (16384 codes: 8 a code, minutes not hours)
        ds = SyntheticDataset(d, min(40 * nb, 1 << 17), 0, nq, seed=1)
        km = faiss.Kmeans(d, nb, niter=10, seed=1)
        km.train(ds.get_train())
        return km.centroids.astype(np.float32), ds.get_queries()
    xb = rng.standard_normal((nb, d)).astype(np.float32)
    xq = (xb[rng.integers(0, nb, nq)] + 0.5 * rng.standard_normal((nq, d))).astype(np.float32)
    return xb, xq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    fp32, bf16, int8 = gemm_rate(torch.float32), gemm_rate(torch.bfloat16), int8_rate()
    lines = [
        f"machine: {cpu()}, {torch.get_num_threads()} torch "
        f"threads, {faiss.omp_get_max_threads()} faiss threads, torch {torch.__version__}, "
        f"faiss {faiss.__version__}",
        f"GEMM rate measured in this run (4096x4096x256): fp32 {fp32:.0f} GFLOP/s, "
        f"bf16 {bf16:.0f} GFLOP/s; int8 (oneDNN u8 x s8, 2048x1024x256) {int8:.0f} GOP/s",
        "",
        "| case | faiss IndexFlatL2 (s) | ours, fp32 (s) | ours, auto (s) | fp32 / faiss "
        "| auto / faiss | auto GFLOP/s | first scan proved | ids differing from faiss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print(*lines[:2], sep="\n")
    for name, nb, d, nq, k, kind in CASES:
        xb, xq = data(kind, nb, d, nq, rng)
        index = faiss.IndexFlatL2(d)
        index.add(xb)
        runs = {
            "faiss": lambda: index.search(xq, k),  # noqa: B023
            "fp32": lambda: knn(xq, xb, k, precision="fp32"),  # noqa: B023
            "auto": lambda: knn(xq, xb, k),  # noqa: B023
        }
        best = dict.fromkeys(runs, float("inf"))
        out = {}
        for _ in range(args.repeats):
            for key, fn in runs.items():
                t0 = time.perf_counter()
                out[key] = fn()
                best[key] = min(best[key], time.perf_counter() - t0)
        stats: Counter[str] = Counter()
        knn(xq, xb, k, stats=stats)
        first = next(iter(stats))[: -len(" scanned")]
        proved = f"{stats[first + ' proven'] / stats[first + ' scanned']:.1%} ({first})"
        I_f, I_a = out["faiss"][1], out["auto"][1]
        assert (out["fp32"][1] == I_a).all(), "fp32 and auto candidates disagree"
        row = (
            f"| {name} | {best['faiss']:.3f} | {best['fp32']:.3f} | {best['auto']:.3f} | "
            f"{best['fp32'] / best['faiss']:.2f} | {best['auto'] / best['faiss']:.2f} | "
            f"{2 * nq * nb * d / best['auto'] / 1e9:.0f} | {proved} | "
            f"{int((I_a != I_f).sum())} of {I_a.size} |"
        )
        print(row, flush=True)
        lines.append(row)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
