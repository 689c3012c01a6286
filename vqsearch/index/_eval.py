"""Evaluation: exact ground truth, recall measures, and timing of a search callable."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from faiss.contrib.evaluation import knn_intersection_measure

from ._knn import knn
from ._validate import Metric, MetricName


def ground_truth(
    xq: Any, xb: Any, k: int, metric: MetricName | Metric = "l2"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (D, I), each (nq, k): what every recall figure is measured against."""
    return knn(xq, xb, k, metric)


def k_recall_at_k(I: np.ndarray, gt: np.ndarray) -> float:
    """k-recall@k: mean fraction of the true k neighbours found among the k returned.
    I, gt (nq, k); the faiss contrib intersection measure."""
    return float(knn_intersection_measure(np.asarray(I), np.asarray(gt)))


def one_recall_at(I: np.ndarray, gt: np.ndarray, r: int | None = None) -> float:
    """1-recall@r: fraction of queries whose true nearest (gt[:, 0]) is in the first r of I."""
    I = np.asarray(I)
    r = I.shape[1] if r is None else r
    return float((I[:, :r] == np.asarray(gt)[:, :1]).any(axis=1).mean())


def nearest_agreement(codes: np.ndarray, gt_codes: np.ndarray) -> float:
    """Fraction of vectors given the same nearest code: 1-recall@1, what tokenization needs."""
    return float((np.asarray(codes).reshape(-1) == np.asarray(gt_codes).reshape(-1)).mean())


@dataclass(frozen=True)
class Timing:
    batch_size: int
    qps: float  # queries per second over all timed batches
    p50_ms: float  # median latency of one batch
    p99_ms: float
    batches: int


def time_search(
    search: Callable[[np.ndarray], Any],
    xq: np.ndarray,
    batch_size: int,
    min_batches: int = 5,
    min_seconds: float = 0.2,
    max_batches: int = 1000,
) -> Timing:
    """Time `search(batch)` over successive batches of xq (nq, d), cycling through xq, after one
    untimed warm-up batch; at least `min_batches` batches and `min_seconds` of work."""
    nq = len(xq)
    batches = [xq[i0 : i0 + batch_size] for i0 in range(0, nq, batch_size)]
    batches = [b for b in batches if len(b) == min(batch_size, nq)]
    search(batches[0])
    lat: list[float] = []
    start = time.perf_counter()
    while len(lat) < max_batches and (
        len(lat) < min_batches or time.perf_counter() - start < min_seconds
    ):
        b = batches[len(lat) % len(batches)]
        t0 = time.perf_counter()
        search(b)
        lat.append(time.perf_counter() - t0)
    n = len(batches[0])
    arr = np.array(lat)
    return Timing(
        n,
        n * len(arr) / arr.sum(),
        1e3 * float(np.percentile(arr, 50)),
        1e3 * float(np.percentile(arr, 99)),
        len(arr),
    )
