"""`vqsearch compare`: measure a bank's recall/speed tradeoff, print it, write JSON and PNG.

Against a running server (`--server URL --bank NAME`, through the client) or a local `.npy`
bank (`--npy FILE`, through the engine in this process).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import _report


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="base URL of a running vqsearch server")
    src.add_argument("--npy", type=Path, help="a local (nb, d) .npy bank")
    p.add_argument("--bank", help="bank name on the server")
    p.add_argument("--metric", default="l2", choices=["l2", "ip", "cosine"], help="for --npy")
    p.add_argument("--queries", type=Path, help="(nq, d) .npy evaluation queries")
    p.add_argument("--spec", action="append", default=[], help="extra faiss spec (repeatable)")
    p.add_argument("--n-queries", type=int, default=1000, help="perturbed queries when none given")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 4096])
    p.add_argument("--min-seconds", type=float, default=0.2, help="timing per point and batch")
    p.add_argument("--out", type=Path, default=Path("tradeoff"), help="writes OUT.json, OUT.png")


class Bar:
    """A one-line progress bar on stderr."""

    def __init__(self, width: int = 40) -> None:
        self.width, self.t0 = width, time.monotonic()

    def __call__(self, frac: float) -> None:
        n = int(self.width * frac)
        elapsed = time.monotonic() - self.t0
        sys.stderr.write(
            f"\r[{'#' * n}{'.' * (self.width - n)}] {100 * frac:5.1f}% {elapsed:6.1f}s"
        )
        sys.stderr.flush()
        if frac >= 1:
            sys.stderr.write("\n")


def _local(args: argparse.Namespace, bar: Bar) -> dict[str, Any]:
    from vqsearch.index import ApproxIndex, perturbed_queries, sweep

    xb = np.load(args.npy, allow_pickle=False)
    if args.queries:
        xq, source = np.load(args.queries, allow_pickle=False), "user"
    else:
        xq, source = perturbed_queries(xb, args.n_queries, args.metric), "perturbed"
    t0 = time.perf_counter()
    own = ApproxIndex.build(xb, metric=args.metric)
    own.meta["build_seconds"] = time.perf_counter() - t0
    report = sweep(
        xb,
        None,
        args.metric,
        xq,
        indexes=[own],
        specs=args.spec,
        batch_sizes=args.batch_sizes,
        min_seconds=args.min_seconds,
        progress=bar,
    )
    return report | {"query_source": source, "index_spec": own.spec, "bank": str(args.npy)}


def _remote(args: argparse.Namespace, bar: Bar) -> dict[str, Any]:
    from vqsearch.client import Client, SweepPhase

    if not args.bank:
        raise SystemExit("--server needs --bank NAME")
    queries = None if args.queries is None else np.load(args.queries, allow_pickle=False)
    with Client(args.server, timeout=600) as c:
        c.tradeoff(
            args.bank, queries, args.spec, args.n_queries, args.batch_sizes, args.min_seconds
        )
        while (job := c.get_tradeoff(args.bank)).state not in (SweepPhase.DONE, SweepPhase.FAILED):
            bar(job.progress)
            time.sleep(0.5)
    if job.state is SweepPhase.FAILED:
        raise SystemExit(f"sweep failed: {job.error}")
    if job.report is None:
        raise SystemExit("the sweep finished without a report")
    bar(1.0)
    return dict(job.report.raw)


def run(args: argparse.Namespace) -> int:
    bar = Bar()
    report = _remote(args, bar) if args.server else _local(args, bar)
    print(_report.table(report))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    _report.plot(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0
