"""Small query batches (what a server answers one request at a time): `Bank.search` against faiss
`IndexFlatL2` on a 16384 x 256 codebook, measured in the same run, with the scan's tiles
bank-major (the default for fp32 blocks of up to `BANK_MAJOR_QUERIES` queries) and row-major.

Per batch size: the median wall time of each, ours / faiss (<= 1.0: at least as fast), and
bank-major / row-major. Each contender runs calls / 2 timed calls after an untimed one (a call
right after the other library's finds the cores busy with its spinning threads), twice over, the
second time in reverse order. The ids of each layout's last call are compared (both layouts are
exact: equal float64 brute force, see tests/). For 1 query both layouts run the same code: their
ratio there shows the noise. faiss' own time jumps between 16 and 256 queries (about 4x its
per-query time at 512, also when run alone): the ratios there compare against that slower path.

    python bench/small.py [--calls 40] [--out bench/results/exact_small.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from _machine import cpu  # bench/ is on sys.path when run as a script

from vqsearch.index import Bank, _scan

NB, D = 16384, 256
SIZES = (1, 4, 16, 64, 256, 512, 1024)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((NB, D)).astype(np.float32)
    bank = Bank(D)
    bank.add(xb)
    index = faiss.IndexFlatL2(D)
    index.add(xb)
    default = _scan.BANK_MAJOR_QUERIES

    def ours(xq: np.ndarray, k: int, limit: int):
        _scan.BANK_MAJOR_QUERIES = limit
        try:
            return bank.search(xq, k, device="cpu", precision="fp32")
        finally:
            _scan.BANK_MAJOR_QUERIES = default

    lines = [
        f"machine: {cpu()}, {torch.get_num_threads()} torch "
        f"threads, {faiss.omp_get_max_threads()} faiss threads, torch {torch.__version__}, "
        f"faiss {faiss.__version__}; codebook {NB}x{D}, fp32 scan, median of {args.calls} calls",
        "",
        "| queries | k | faiss (ms) | ours, row-major (ms) | ours, default (ms) "
        "| default / faiss | default / row-major |",
        "|---|---|---|---|---|---|---|",
    ]
    print(lines[0])
    for k in (1, 10):
        for nq in SIZES:
            xq = (xb[rng.integers(0, NB, nq)] + 0.5 * rng.standard_normal((nq, D))).astype(
                np.float32
            )
            runs = {
                "faiss": lambda: index.search(xq, k),  # noqa: B023
                "row": lambda: ours(xq, k, 0),  # noqa: B023
                "default": lambda: ours(xq, k, default),  # noqa: B023
            }
            times: dict[str, list[float]] = {key: [] for key in runs}
            out = {}
            for order in (list(runs), list(runs)[::-1]):
                for key in order:
                    fn = runs[key]
                    fn()  # the other library's threads may still spin: not timed
                    for _ in range(args.calls // 2):
                        t0 = time.perf_counter()
                        out[key] = fn()
                        times[key].append(time.perf_counter() - t0)
            assert (out["row"][1] == out["default"][1]).all(), "the layouts disagree"
            t = {key: 1e3 * float(np.median(v)) for key, v in times.items()}
            row = (
                f"| {nq} | {k} | {t['faiss']:.2f} | {t['row']:.2f} | {t['default']:.2f} | "
                f"{t['default'] / t['faiss']:.2f} | {t['default'] / t['row']:.2f} |"
            )
            print(row, flush=True)
            lines.append(row)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
