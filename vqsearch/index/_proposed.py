"""Approximate search with exact distances: a compressed index proposes, the bank decides.

The index (PQ, IVF-PQ, OPQ, fast-scan: codes only, no `RFlat` copy of the vectors) proposes
ceil(k x k_factor) ids per query. Each one the bank still holds is scored by the metric's
float64 formula from the bank's own rows (its memory-mapped segments, read at the candidates'
rows only), and the k best by (distance, id) are returned. So every distance returned is the
exact distance of its id, ties go to the lowest id, and the recall lost is only in which ids
were proposed. Ids the index holds but the bank no longer does (deleted since the build) are
never returned.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ._rerank import rerank
from ._validate import Queries, check_k, check_k_factor

if TYPE_CHECKING:
    from ._bank import Bank
    from ._pq import ApproxIndex


class Proposer(Protocol):
    """What proposes candidates: an `ApproxIndex` (its `search`, on validated queries)."""

    @property
    def ntotal(self) -> int: ...

    def search(
        self, xq: Any, k: int, nprobe: int | None = None, k_factor: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


def search_proposed(
    bank: Bank,
    index: Proposer,
    xq: Any,
    k: int,
    k_factor: float = 4.0,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """xq (nq, d) -> D (nq, k) as `Bank.search` reports it, I (nq, k) ids: the k best of the
    candidates `index` proposes, by exact float64 distance from `bank`'s rows. Where fewer
    than k live candidates came back, I is -1 and D is inf (l2) or -inf (ip, cosine)."""
    D, I = _proposed(bank, index, xq, k, k_factor, nprobe)
    return bank._metric.reported(D).numpy(), I.numpy()


def search_proposed64(
    bank: Bank,
    index: Proposer,
    xq: Any,
    k: int,
    k_factor: float = 4.0,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`search_proposed` as `merge_shards` takes it: D (nq, k) float64 'smaller is nearer'
    (inf where I is -1), I (nq, k)."""
    D, I = _proposed(bank, index, xq, k, k_factor, nprobe)
    return D.numpy(), I.numpy()


def _proposed(
    bank: Bank, index: Proposer, xq: Any, k: int, k_factor: float, nprobe: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    k_factor = check_k_factor(k_factor)
    state, metric = bank._state, bank._metric
    x = bank._queries(xq)  # the rows as given: scored as Bank.search scores them
    k = check_k(k, index.ntotal)
    kk = min(index.ntotal, math.ceil(k * k_factor))
    _, C = index.search(Queries.of(x, bank.d, metric), kk, nprobe=nprobe)
    rows, live = state.rows_where(C.reshape(-1))
    shape = C.shape
    D, I = rerank(
        x.cpu(),
        None,
        torch.from_numpy(rows.reshape(shape)),
        torch.from_numpy(~live.reshape(shape)),
        state,
        metric,
        k,
    )
    I[torch.isinf(D)] = -1  # a deleted or absent candidate's slot
    return D, I


def search_index(
    bank: Bank,
    index: ApproxIndex,
    xq: Any,
    k: int,
    nprobe: int | None = None,
    k_factor: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate search as the service answers it: an index with a re-ranking copy of its
    own (`RFlat`, `Refine`) answers alone, with faiss's distances; any other proposes and
    `bank` re-ranks (`search_proposed`), so the distances are exact. k_factor: the index's
    own default when None."""
    if index.has_refine:
        x = Queries.of(bank._queries(xq), bank.d, bank._metric)
        return index.search(x, k, nprobe=nprobe, k_factor=k_factor)
    kf = index.k_factor if k_factor is None else k_factor
    return search_proposed(bank, index, xq, k, k_factor=kf, nprobe=nprobe)
