"""Accuracy against speed: sweep exact search and faiss settings on one bank, mark the Pareto
frontier, and pick the fastest setting that reaches a recall target.

Every recall figure is measured against exact ground truth on the same queries; every timing is
measured in the same run, on the same machine, with the same queries.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import faiss
import numpy as np
import torch

from ._bank import Bank
from ._eval import k_recall_at_k, one_recall_at, time_search
from ._knn import knn
from ._pq import ApproxIndex
from ._proposed import search_index
from ._validate import Metric, MetricName, check_metric

BATCH_SIZES = (1, 64, 4096)
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
K_FACTORS = (1, 2, 4, 8, 16)
K = 10


@dataclass
class Point:
    """One measured setting. `spec` is "exact" or a faiss factory string."""

    spec: str
    nprobe: int | None = None
    k_factor: float | None = None
    recall_1_at_1: float = 1.0  # fraction of queries whose nearest is right: tokenization
    recall_10_at_10: float = 1.0  # faiss intersection measure at k = 10
    qps: dict[str, float] = field(default_factory=dict)  # batch size -> queries per second
    p50_ms: dict[str, float] = field(default_factory=dict)
    p99_ms: dict[str, float] = field(default_factory=dict)
    build_seconds: float = 0.0
    bytes_per_vector: float = 0.0
    pareto: bool = False

    @property
    def label(self) -> str:
        if self.spec == "exact":
            return "exact"
        params = [
            f"nprobe={self.nprobe}" if self.nprobe else "",
            f"k_factor={self.k_factor:g}" if self.k_factor else "",
        ]
        return (f"{self.spec} " + ",".join(p for p in params if p)).rstrip()


def pareto_front(recall: Sequence[float], speed: Sequence[float]) -> list[bool]:
    """True for points no other point beats on both (at least as good on both, better on one)."""
    out = []
    for i, (r, s) in enumerate(zip(recall, speed, strict=True)):
        dominated = any(
            r2 >= r and s2 >= s and (r2 > r or s2 > s)
            for j, (r2, s2) in enumerate(zip(recall, speed, strict=True))
            if j != i
        )
        out.append(not dominated)
    return out


def grid(index: ApproxIndex) -> list[tuple[int | None, float | None]]:
    """The (nprobe, k_factor) settings worth measuring for this index."""
    nlist = index.nlist
    nprobes: list[int | None] = [None] if nlist is None else [p for p in NPROBES if p <= nlist]
    if nlist is not None and nlist not in nprobes and nlist <= 2 * NPROBES[-1]:
        nprobes.append(nlist)
    # every index re-ranks a k x k_factor shortlist: its own RFlat copy, or the bank
    return [(p, float(kf)) for p in nprobes for kf in K_FACTORS]


def perturbed_queries(
    xb: np.ndarray | Bank, n: int, metric: MetricName | Metric, seed: int = 0
) -> np.ndarray:
    """Bank vectors plus Gaussian noise whose norm is their nearest-neighbour distance:
    queries that look like encoder outputs near, but not on, their codes. xb: a matrix, or a
    bank (read at the sampled rows and searched exactly, never copied whole)."""
    rng = np.random.default_rng(seed)
    nb = xb.ntotal if isinstance(xb, Bank) else len(xb)
    rows = rng.choice(nb, min(n, nb), replace=False)
    if isinstance(xb, Bank):
        base = xb.get(xb.ids()[rows])
        D = xb.snapshot("l2").search(base, min(2, nb))[0]  # as stored, whatever its metric
    else:
        base = xb[rows].astype(np.float32)
        D, _ = knn(base, xb, min(2, nb), "l2")
    nn = np.sqrt(np.maximum(D[:, -1], 0))[:, None]
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise *= nn / np.linalg.norm(noise, axis=1, keepdims=True)
    out = base + noise
    if check_metric(metric).unit:
        out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
    }


def _measure(
    point: Point,
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    xq: np.ndarray,
    gt: np.ndarray,
    batch_sizes: Sequence[int],
    min_seconds: float,
) -> Point:
    I = search(xq, K)[1]
    point.recall_1_at_1 = one_recall_at(I, gt, 1)
    point.recall_10_at_10 = k_recall_at_k(I, gt)
    for bs in batch_sizes:
        t = time_search(lambda b: search(b, K), xq, min(bs, len(xq)), min_seconds=min_seconds)
        key = str(bs)
        point.qps[key], point.p50_ms[key], point.p99_ms[key] = t.qps, t.p50_ms, t.p99_ms
    return point


class Served(Protocol):
    """How the measured answers are got: exact search, and the approximate search of an
    index given to `sweep` (a service's own path, such as a sharded bank's shards). Each
    takes xq (nq, d) and returns (D, I), each (nq, k)."""

    def exact(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def approx(
        self, index: ApproxIndex, xq: np.ndarray, k: int, nprobe: int | None, k_factor: float | None
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class InProcess:
    """`Served` by the bank in this process: `Bank.search`, `search_index`."""

    bank: Bank
    device: str = "cpu"

    def exact(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.bank.search(xq, k, device=self.device)

    def approx(
        self, index: ApproxIndex, xq: np.ndarray, k: int, nprobe: int | None, k_factor: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        return search_index(self.bank, index, xq, k, nprobe=nprobe, k_factor=k_factor)


def sweep(
    xb: np.ndarray | Bank,
    ids: np.ndarray | None,
    metric: MetricName | Metric,
    xq: np.ndarray,
    indexes: Sequence[ApproxIndex] = (),
    specs: Sequence[str] = (),
    batch_sizes: Sequence[int] = BATCH_SIZES,
    primary_batch: int = 64,
    min_seconds: float = 0.2,
    progress: Callable[[float], None] | None = None,
    device: str = "cpu",
    served: Served | None = None,
) -> dict[str, Any]:
    """Measure exact search, each given index over its grid, and each extra spec (built here,
    then dropped), each as the service serves it (`search_index`). xb (nb, d) with ids, or a
    `Bank` (its own ids; read where its rows lie, never copied whole); xq (nq, d). `served`:
    how exact search and the given indexes answer (default: `InProcess` on xb); the extra
    specs always answer here. Returns a JSON-ready report whose `points` have `pareto` set
    on (1-recall@1, QPS at `primary_batch`)."""
    if isinstance(xb, Bank):
        if check_metric(metric).name != xb.metric:
            raise ValueError(f"the bank's metric is {xb.metric}, not {metric}")
        bank = xb
    else:
        ids = np.arange(len(xb), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        bank = Bank(xb.shape[1], metric)  # as the service searches: bank statistics cached
        bank.add(xb, ids)
    nb, d = bank.ntotal, bank.d
    if nb < K:
        raise ValueError(f"a sweep needs at least {K} vectors; the bank has {nb}")
    tick = progress or (lambda _: None)
    gt = bank.search(xq, K)[1]
    # Progress: building the extra specs is the first 20 %, measuring the points the rest.
    built: list[tuple[ApproxIndex, float]] = [
        (ix, float(ix.meta.get("build_seconds", 0))) for ix in indexes
    ]
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        built.append((ApproxIndex.build(bank, spec=spec), time.perf_counter() - t0))
        tick(0.2 * (i + 1) / len(specs))
    todo = [(ix, b, setting) for ix, b in built for setting in grid(ix)]

    here = InProcess(bank, device)
    given = served or here
    owned = {id(ix) for ix in indexes}
    exact = Point("exact", bytes_per_vector=4.0 * d)
    points = [_measure(exact, given.exact, xq, gt, batch_sizes, min_seconds)]
    for n, (index, build, (nprobe, k_factor)) in enumerate(todo):

        def approx(
            b: np.ndarray,
            k: int,
            ix: ApproxIndex = index,
            p: int | None = nprobe,
            f: float | None = k_factor,
        ) -> tuple[np.ndarray, np.ndarray]:
            return (given if id(ix) in owned else here).approx(ix, b, k, p, f)

        size = index.nbytes / max(index.ntotal, 1)
        pt = Point(index.spec, nprobe, k_factor, build_seconds=build, bytes_per_vector=size)
        points.append(_measure(pt, approx, xq, gt, batch_sizes, min_seconds))
        tick(0.2 + 0.8 * (n + 1) / len(todo))
    tick(1.0)
    key = str(primary_batch if primary_batch in batch_sizes else batch_sizes[0])
    front = pareto_front([p.recall_1_at_1 for p in points], [p.qps[key] for p in points])
    for p, f in zip(points, front, strict=True):
        p.pareto = f
    return {
        "points": [asdict(p) | {"label": p.label} for p in points],
        "primary_batch": int(key),
        "k": K,
        "n_queries": len(xq),
        "nb": nb,
        "d": d,
        "metric": str(metric),
        "device": device,
        "machine": machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def pick(
    report: dict[str, Any],
    target: float,
    measure: str = "recall_1_at_1",
    spec: str | None = None,
    batch: int | None = None,
) -> dict[str, Any]:
    """The fastest measured point reaching `target` on `measure`, among exact and the points of
    `spec` (all specs when None); exact when none reaches it."""
    key = str(batch or report["primary_batch"])
    pts = [p for p in report["points"] if p["spec"] == "exact" or spec is None or p["spec"] == spec]
    ok = [p for p in pts if p[measure] >= target and key in p["qps"]]
    exact = next(p for p in report["points"] if p["spec"] == "exact")
    if not ok:
        return exact
    return max(ok, key=lambda p: (p["qps"][key], p["spec"] == "exact"))
