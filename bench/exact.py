"""Exact search: our `knn` against faiss `IndexFlatL2`, measured in the same run.

Prints, per case, the best-of-N wall time of each and the ratio ours / faiss (<= 1.0 means we are
at least as fast), and how many ids differ from faiss (faiss is float32 and not tie-exact, so a
few differences on near-ties are expected; ours equal float64 brute force, see tests/).

    python bench/exact.py [--repeats 3] [--out bench/results/exact.md]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from vqsearch.index import knn

CASES = [
    # name, nb, d, nq, k, data
    ("codebook 16384x256, 16384 queries, k=1", 16384, 256, 16384, 1),
    ("bank 200000x128, 1000 queries, k=10", 200_000, 128, 1000, 10),
    ("bank 1000000x128, 1000 queries, k=10", 1_000_000, 128, 1000, 10),
]


def best_of(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, {faiss.omp_get_max_threads()} faiss threads, torch {torch.__version__}, "
        f"faiss {faiss.__version__}",
        "",
        "| case | ours (s) | faiss IndexFlatL2 (s) | ours / faiss | ids differing from faiss |",
        "|---|---|---|---|---|",
    ]
    print(lines[0])
    for name, nb, d, nq, k in CASES:
        xb = rng.standard_normal((nb, d)).astype(np.float32)
        xq = (xb[rng.integers(0, nb, nq)] + 0.5 * rng.standard_normal((nq, d))).astype(np.float32)
        index = faiss.IndexFlatL2(d)
        index.add(xb)
        t_faiss, (_, If) = best_of(lambda: index.search(xq, k), args.repeats)  # noqa: B023
        t_ours, (_, Io) = best_of(lambda: knn(xq, xb, k, device="cpu"), args.repeats)  # noqa: B023
        row = (
            f"| {name} | {t_ours:.3f} | {t_faiss:.3f} | {t_ours / t_faiss:.2f} | "
            f"{int((Io != If).sum())} of {Io.size} |"
        )
        print(row, flush=True)
        lines.append(row)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
