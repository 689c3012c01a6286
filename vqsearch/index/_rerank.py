"""The float64 half of an exact search: re-rank a scan's candidates, or scan everything.

Both score by the metric's direct formula (`Metric.exact64`) and order by (distance, id), so
their answers are float64 brute force's, ties by the lowest id.
"""

from __future__ import annotations

import math

import torch

from ._metric import Metric
from ._rows import RowSource

RERANK_ELEMS = 1 << 16  # float64: 512 KiB chunks, kept in malloc's heaps (never mmapped)
GPU_RERANK_ELEMS = 1 << 24


def lex_topk(
    dist: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k smallest by (distance, id) per row; also returns their column positions."""
    o1 = torch.argsort(ids, dim=1, stable=True)
    o2 = torch.argsort(dist.gather(1, o1), dim=1, stable=True)[:, :k]
    pos = o1.gather(1, o2)
    return dist.gather(1, pos), ids.gather(1, pos), pos


def rerank(
    xq: torch.Tensor,
    which: torch.Tensor | None,
    rows: torch.Tensor,
    dead: torch.Tensor,
    src: RowSource,
    metric: Metric,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (D float64, ids) of the k best among the candidate rows (nq, K) of the queries
    xq[which] (which: (nq,) positions, gathered chunk by chunk rather than copied whole; None:
    all of xq). rows, dead and the results are on `src.device`."""
    nq, kk = rows.shape
    dev = src.device
    out_d = torch.empty(nq, k, dtype=torch.float64, device=dev)
    out_i = torch.empty(nq, k, dtype=torch.int64, device=dev)
    qc = max(1, (RERANK_ELEMS if dev.type == "cpu" else GPU_RERANK_ELEMS) // max(1, kk * src.d))
    which = None if which is None else which.to(xq.device)
    for i0 in range(0, nq, qc):
        r = rows[i0 : i0 + qc]
        x = (xq[i0 : i0 + qc] if which is None else xq[which[i0 : i0 + qc]]).to(dev)
        dist = metric.exact64(x, src.take(r)).masked_fill_(dead[i0 : i0 + qc], math.inf)
        if kk == 1:  # the proven nearest: nothing to order
            out_d[i0 : i0 + qc], out_i[i0 : i0 + qc] = dist, src.ids(r)
            continue
        out_d[i0 : i0 + qc], out_i[i0 : i0 + qc], _ = lex_topk(dist, src.ids(r), k)
    return out_d, out_i


def scan64(
    xq: torch.Tensor, src: RowSource, metric: Metric, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 brute force on the CPU, one query at a time: the last scan of every chain,
    for the queries no candidate scan proved. Results on `src.device`."""
    xq = xq.cpu()
    nq = xq.shape[0]
    out_d = torch.empty(nq, k, dtype=torch.float64)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    bs = max(k, RERANK_ELEMS // src.d)
    for q in range(nq):
        best_d = torch.empty(1, 0, dtype=torch.float64)
        best_i = torch.empty(1, 0, dtype=torch.int64)
        for r0, y, dead in src.blocks(bs):
            dist = metric.exact64(xq[q : q + 1], y.cpu().unsqueeze(0))
            if dead is not None:
                dist.masked_fill_(dead.cpu().unsqueeze(0), math.inf)
            ids = src.ids(torch.arange(r0, r0 + y.shape[0], device=y.device).unsqueeze(0))
            best_d, best_i, _ = lex_topk(
                torch.cat([best_d, dist], 1), torch.cat([best_i, ids.cpu()], 1), k
            )
        out_d[q], out_i[q] = best_d[0], best_i[0]
    return out_d.to(src.device), out_i.to(src.device)
