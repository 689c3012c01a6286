"""Accuracy against speed on two seeded cases; writes bench/results/tradeoff_<case>.{md,json,png}.

- synthetic: faiss `SyntheticDataset(64, 0, 50000, 1000, seed=1234)`, l2.
- tokenization: a 16384 x 256 codebook and 4096 queries that are codebook vectors plus noise
  whose norm is each code's nearest-neighbour distance (an encoder output near its code).

Every spec from the issue (PQ, IVF-PQ, IVF-PQ fast-scan, OPQ-IVF-PQ), each with and without
RFlat, over its nprobe x k_factor grid; recall against exact ground truth from the same run.

    python bench/tradeoff.py [--min-seconds 0.1] [--case synthetic|tokenization]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from faiss.contrib.datasets import SyntheticDataset

from vqsearch import _report
from vqsearch.index import perturbed_queries, sweep

OUT = Path(__file__).parent / "results"


def specs(m: int, m4: int, nlist: int, opq: int) -> list[str]:
    base = [f"PQ{m}", f"IVF{nlist},PQ{m}", f"IVF{nlist},PQ{m4}x4fs", f"OPQ{opq},IVF{nlist},PQ{opq}"]
    return [s for b in base for s in (b, f"{b},RFlat")]


def case(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if name == "synthetic":
        ds = SyntheticDataset(64, 0, 50000, 1000, seed=1234)
        return ds.get_database(), ds.get_queries(), specs(16, 32, 256, 16)
    rng = np.random.default_rng(1234)
    codebook = rng.standard_normal((16384, 256), dtype=np.float32)
    # 8-bit PQ and OPQ with 32 sub-quantizers (8 dims each): OPQ64 on d=256 trains for many
    # minutes on 2 cores; fast-scan with 128 (2 dims each), as the default spec would.
    return codebook, perturbed_queries(codebook, 4096, "l2", seed=1234), specs(32, 128, 128, 32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=["synthetic", "tokenization"], action="append")
    ap.add_argument("--min-seconds", type=float, default=0.1)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    for name in args.case or ["synthetic", "tokenization"]:
        xb, xq, todo = case(name)
        t0 = time.time()

        def tick(f: float, t0: float = t0, name: str = name) -> None:
            print(f"\r{name}: {100 * f:5.1f}% {time.time() - t0:6.0f}s", end="", flush=True)

        report = sweep(xb, None, "l2", xq, specs=todo, min_seconds=args.min_seconds, progress=tick)
        report |= {
            "query_source": "synthetic queries" if name == "synthetic" else "perturbed codes",
            "case": name,
        }
        print()
        (OUT / f"tradeoff_{name}.json").write_text(json.dumps(report, indent=1))
        _report.plot(
            report, OUT / f"tradeoff_{name}.png", title=f"{name}: nb={len(xb)} d={xb.shape[1]}"
        )
        head = (
            f"# {name}: nb={len(xb)}, d={xb.shape[1]}, {len(xq)} queries, l2\n\n"
            f"machine: {report['machine']}\n\nQPS at batch sizes 1, 64, 4096 (capped at nq); "
            f"frontier on 1-recall@1 against QPS at batch {report['primary_batch']}.\n\n"
        )
        (OUT / f"tradeoff_{name}.md").write_text(head + _report.table(report) + "\n")
        print(f"{name}: {len(report['points'])} points in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
