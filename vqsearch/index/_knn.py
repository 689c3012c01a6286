"""`knn`: exact search over a plain matrix, shaped like `faiss.knn`."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

from ._bank import to_host
from ._errors import EmptyBankError, ZeroVectorError
from ._exact import exact_search
from ._rows import MatrixRows, bank_center
from ._validate import Metric, MetricName, as_matrix, check_k, check_metric, resolve_device


def _check_nonzero(x: torch.Tensor, name: str) -> None:
    zero = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64) == 0
    if bool(zero.any()):
        raise ZeroVectorError(
            f"{name} row {int(zero.nonzero()[0, 0])} is a zero vector; cosine is undefined for it"
        )


def knn(
    xq: Any,
    xb: Any,
    k: int,
    metric: MetricName | Metric = "l2",
    device: str = "auto",
    tile_elems: int | None = None,
    precision: str = "auto",
    stats: Counter[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each query in xb, equal to float64 brute force.

    xq (nq, d), xb (nb, d): numpy arrays or torch tensors of any real dtype (searched as float32).
    Returns D (nq, k) float32 and I (nq, k) int64 row numbers of xb, nearest first, ties broken
    by the lowest row. l2: squared distances; ip: inner products; cosine: cosine similarities.
    Scratch memory is bounded by `tile_elems` (default: 2**21 on a CPU, 2**29 on a GPU; see
    `vqsearch.index._exact`), not by nq x nb. precision: the candidate scan's arithmetic,
    'auto' (see `_precision.choose`), 'fp32', 'bf16', 'fp16' (the fused GPU kernel, k = 1) or
    'int8' (CPU, k = 1); the answer is exact in all of them, only the speed differs. stats: a
    Counter to which each scan adds how many queries it scanned and proved ("bf16 k=1
    scanned", ...); the unproved went on to the next.
    """
    m = check_metric(metric)
    xb_t = as_matrix(xb, "xb")
    nb, d = xb_t.shape
    if nb == 0:
        raise EmptyBankError("xb holds no vector")
    xq_t = as_matrix(xq, "xq", d)
    k = check_k(k, nb)
    if m.unit:
        _check_nonzero(xq_t, "xq")
        _check_nonzero(xb_t, "xb")
    dev = resolve_device(device)
    src = MatrixRows(xb_t.to(dev))
    center = bank_center(src, m)
    D, I = exact_search(xq_t, src, center, m, k, dev, tile_elems, precision, stats)
    D_h, I_h = to_host(m.reported(D), I)
    return D_h, I_h
