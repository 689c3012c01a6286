"""Answers of disjoint parts of a bank (shards) merged into the answer of the whole.

Each part answers with `Bank.search64`: float64 distances from the metric's direct formula,
which depend on the query and the row alone, never on the part that holds the row. The k best
of all parts by (distance, id) are therefore the whole bank's k best, ties by the lowest id:
float64 brute force's answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ._metric import Metric
from ._rerank import lex_topk
from ._validate import check_metric


def merge_shards(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, metric: str | Metric
) -> tuple[np.ndarray, np.ndarray]:
    """parts: (D (nq, k_i) float64 smaller-is-nearer, I (nq, k_i) int64) of each shard, the
    ids disjoint, sum of k_i >= k -> D (nq, k) float32 as reported by the metric, I (nq, k)."""
    m = check_metric(metric)
    nq = len(parts[0][0]) if parts else 0
    D = torch.from_numpy(np.concatenate([p[0] for p in parts], axis=1, dtype=np.float64))
    I = torch.from_numpy(np.concatenate([p[1] for p in parts], axis=1, dtype=np.int64))
    if D.shape[1] < k:
        raise ValueError(f"the shards hold {D.shape[1]} candidates for k={k}")
    if nq == 0:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    D, I, _ = lex_topk(D, I, k)
    return m.reported(D).numpy(), I.numpy()
