"""Exact k-NN by torch matmul expansion, equal to float64 brute force (ties: lowest id first).

1. Scan. float32 scores, blocked over queries (``bs_q``) and bank (``bs_b``) with a running top-K
   (K = k + 2): ``s = ||y||^2 - 2 x.y`` for l2 with both sides centred on the bank mean (the
   norm of x is constant per query, so it is left out), ``s = -x.y`` for ip and cosine.
2. Re-rank. The K kept rows are scored again in float64 by the direct formula (``sum((x-y)^2)``,
   ``x.y``, ``x.y / |x||y|``) and sorted by (distance, id).

Why this is exact, whatever the data: each float32 score is within ``E_q = c (|x_q| + R)^2`` of
its true value (R the bank radius around the centre, ``c = 2 (d + 8) u`` twice the textbook
dot-product rounding bound). With tau the k-th smallest kept score, every true top-k row (ties
included) scores at most ``tau + 2 E_q``. If the K-th kept score is above that, the kept rows hold
all of them and the float64 re-rank is exact. Otherwise (near-ties, or large norms against tiny
gaps) the query is scanned again keeping k + 32 rows, and if that cannot prove it either, by a
float64 scan of the whole bank. Centring on the mean is what
keeps R, and so E_q, small for data far from the origin.

k = 1 takes a cheaper scan than a top-K: a running best and second-best score (per tile a min,
then a min with the winner masked); a query whose best is not provably unique (second best within
``2 E_q``) goes through the top-K path.

Scratch memory: the score tile is ``bs_q x bs_b`` float32 (``tile_elems`` elements: 2**21, 8 MiB,
for k = 1; 2**23, 32 MiB, for top-k), plus small per-tile selections (group minima), the running
``bs_q x 2K`` state, and re-rank chunks of at most 2**21 float64 elements (16 MiB). It does not
grow with nq x nb: under 64 MiB at the defaults, plus the centred query block (bs_q x d float32).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ._rows import RowSource, prepare, prepared_blocks
from ._validate import Metric

U32 = 2.0**-24
TILE_ELEMS = 1 << 21  # k = 1: 2048 queries x 1024 rows, measured fastest here
TOPK_TILE_ELEMS = 1 << 23  # top-k: 1024 queries x 8192 rows, room for the group minima
GROUP = 32
RERANK_ELEMS = 1 << 21
MARGINS = (2, 32)  # kept beyond k by the first scan, then by a retry for unproven queries


def _unit_roundoff(device: torch.device) -> float:
    # TF32 rounds the GEMM inputs to 10 mantissa bits; the bound must say so.
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11
    return U32


def _error_bound(xs: torch.Tensor, radius2: torch.Tensor, metric: Metric) -> torch.Tensor:
    """E_q (nq,) float64: bound on |float32 score - true score| for every row of the bank,
    given radius2, the largest float32 squared norm of a (prepared) bank row."""
    d = xs.shape[1]
    c = 2.0 * (d + 8) * _unit_roundoff(xs.device)
    xn = torch.linalg.vector_norm(xs.double(), dim=1).cpu()
    radius = math.sqrt(float(radius2)) * (1 + 1e-5)  # the float32 norm's own rounding
    if metric == "l2":
        e = c * (xn + radius) ** 2
    elif metric == "ip":
        e = c * xn * radius
    else:  # unit vectors; normalising each side adds about (d + 3) u more
        e = torch.full_like(xn, 2.0 * c)
    # A non-finite bound (float32 overflow) sends the query to the float64 scan.
    return torch.where(torch.isfinite(e), e, torch.full_like(e, math.inf))


def _tiles(
    xs: torch.Tensor,
    src: RowSource,
    center: torch.Tensor | None,
    metric: Metric,
    bs_b: int,
    radius2: torch.Tensor,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(r0, float32 score tile (bq, nbk)) over the bank, smaller is nearer, dead rows at +inf;
    each tile is valid until the next is yielded (they share a buffer). Updates radius2 (0-d
    tensor) in place to the largest squared norm of a prepared row."""
    # One buffer for every tile of the scan: fresh 8-32 MiB tiles would each be page-faulted in.
    buf = torch.empty(xs.shape[0] * bs_b, device=xs.device)
    for r0, yp, yn, dead in prepared_blocks(src, bs_b, metric, center, xs.device):
        if yn.numel():
            torch.maximum(radius2, yn.max(), out=radius2)
        tile = buf[: xs.shape[0] * yp.shape[0]].view(xs.shape[0], yp.shape[0])
        if metric == "l2":
            torch.addmm(yn.unsqueeze(0), xs, yp.T, beta=1.0, alpha=-2.0, out=tile)
        else:
            torch.mm(xs, yp.T, out=tile).neg_()
        if dead is not None:
            tile.masked_fill_(dead.unsqueeze(0), math.inf)
        yield r0, tile


def exact64(x: torch.Tensor, y: torch.Tensor, metric: Metric) -> torch.Tensor:
    """float64 distance (smaller is nearer) of x (q, d) to y (q, m, d) by the direct formula."""
    x, y = x.double().unsqueeze(1), y.double()
    if metric == "l2":
        return ((y - x) ** 2).sum(-1)
    if metric == "cosine":
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        y = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    return -(y * x).sum(-1)


def lex_topk(
    dist: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k smallest by (distance, id) per row; also returns their column positions."""
    o1 = torch.argsort(ids, dim=1, stable=True)
    o2 = torch.argsort(dist.gather(1, o1), dim=1, stable=True)[:, :k]
    pos = o1.gather(1, o2)
    return dist.gather(1, pos), ids.gather(1, pos), pos


def _rerank(
    xq: torch.Tensor, rows: torch.Tensor, dead: torch.Tensor, src: RowSource, metric: Metric, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (D float64, ids) of the k best among the given candidate rows (nq, K)."""
    nq, kk = rows.shape
    out_d = torch.empty(nq, k, dtype=torch.float64)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    qc = max(1, RERANK_ELEMS // max(1, kk * src.d))
    for i0 in range(0, nq, qc):
        r = rows[i0 : i0 + qc]
        dist = exact64(xq[i0 : i0 + qc], src.take(r), metric).masked_fill_(
            dead[i0 : i0 + qc], math.inf
        )
        out_d[i0 : i0 + qc], out_i[i0 : i0 + qc], _ = lex_topk(dist, src.ids(r), k)
    return out_d, out_i


def _scan64(
    xq: torch.Tensor, src: RowSource, metric: Metric, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 brute force, one query at a time: the fallback for unprovable queries."""
    nq = xq.shape[0]
    out_d = torch.empty(nq, k, dtype=torch.float64)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    bs = max(k, RERANK_ELEMS // src.d)
    for q in range(nq):
        best_d = torch.empty(1, 0, dtype=torch.float64)
        best_i = torch.empty(1, 0, dtype=torch.int64)
        for r0, y, dead in src.blocks(bs):
            dist = exact64(xq[q : q + 1], y.cpu().unsqueeze(0), metric)
            if dead is not None:
                dist.masked_fill_(dead.cpu().unsqueeze(0), math.inf)
            ids = src.ids(torch.arange(r0, r0 + y.shape[0]).unsqueeze(0))
            best_d, best_i, _ = lex_topk(
                torch.cat([best_d, dist], 1), torch.cat([best_i, ids], 1), k
            )
        out_d[q], out_i[q] = best_d[0], best_i[0]
    return out_d, out_i


def _block_sizes(nq: int, tile_elems: int, bs_b: int) -> tuple[int, int]:
    """(bs_q, bs_b): bank blocks of the preferred size (a multiple of GROUP), as many queries
    as fit in the tile."""
    bs_b = max(GROUP, min(bs_b, tile_elems // 16) // GROUP * GROUP)
    return max(1, min(nq, tile_elems // bs_b)), bs_b


def _tile_topk(tile: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kk smallest of each row (unsorted) and their columns.

    A plain `topk` over the tile costs more than the GEMM that made it. Instead take the minimum
    of each group of GROUP columns, the kk groups with the smallest minima, and a `topk` within
    them. Every column left out scores at least the kk-th kept score: a row's kk best groups hold
    kk distinct minima no larger than anything in the groups left out.
    """
    bq, nbk = tile.shape
    ng = nbk // GROUP
    if nbk % GROUP or ng <= kk:
        return tile.topk(min(kk, nbk), dim=1, largest=False, sorted=False)
    groups = tile.view(bq, ng, GROUP)
    _, gi = groups.amin(2).topk(kk, dim=1, largest=False, sorted=False)
    cand = groups.gather(1, gi.unsqueeze(2).expand(-1, -1, GROUP)).reshape(bq, kk * GROUP)
    v, j = cand.topk(kk, dim=1, largest=False, sorted=False)
    return v, gi.gather(1, j // GROUP) * GROUP + j % GROUP


def _scan_topk(
    xs: torch.Tensor,
    src: RowSource,
    center: torch.Tensor | None,
    metric: Metric,
    kk: int,
    bs_b: int,
    radius2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running float32 top-kk (scores, rows) of one query block; rows are global row numbers."""
    bq = xs.shape[0]
    vals = torch.empty(bq, 0, device=xs.device)
    rows = torch.empty(bq, 0, dtype=torch.int64, device=xs.device)
    for r0, tile in _tiles(xs, src, center, metric, bs_b, radius2):
        v, i = _tile_topk(tile, kk)
        vals, rows = torch.cat([vals, v], 1), torch.cat([rows, i + r0], 1)
        if vals.shape[1] > kk:
            vals, j = vals.topk(kk, dim=1, largest=False, sorted=False)
            rows = rows.gather(1, j)
    return vals, rows


def search_topk(
    xq: torch.Tensor,
    src: RowSource,
    center: torch.Tensor | None,
    metric: Metric,
    k: int,
    device: torch.device,
    tile_elems: int = TOPK_TILE_ELEMS,
    margins: tuple[int, ...] = MARGINS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k: (D float64 (nq, k), ids int64 (nq, k)), D as 'smaller is nearer'.
    Queries the first scan cannot prove exact are scanned again keeping more rows, and those
    still unproven by the float64 scan."""
    nq = xq.shape[0]
    if not margins:
        return _scan64(xq.cpu(), src, metric, k)
    kk = min(src.n, k + margins[0])
    bs_q, bs_b = _block_sizes(nq, tile_elems, 8192)
    out_d = torch.empty(nq, k, dtype=torch.float64)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    for i0 in range(0, nq, bs_q):
        x = xq[i0 : i0 + bs_q]
        xs = prepare(x.to(device), metric, center)
        radius2 = torch.zeros((), device=device)
        vals, rows = _scan_topk(xs, src, center, metric, kk, bs_b, radius2)
        vals, order = vals.sort(1)
        vals, rows = vals.double().cpu(), rows.gather(1, order).cpu()
        thr = vals[:, k - 1] + 2 * _error_bound(xs, radius2, metric)
        ok = (vals[:, -1] > thr) | (kk >= src.n)
        d_blk, i_blk = _rerank(x[ok].cpu(), rows[ok], vals[ok].isinf(), src, metric, k)
        out_d[i0 : i0 + bs_q][ok], out_i[i0 : i0 + bs_q][ok] = d_blk, i_blk
        if not bool(ok.all()):
            rest = search_topk(x[~ok], src, center, metric, k, device, tile_elems, margins[1:])
            out_d[i0 : i0 + bs_q][~ok], out_i[i0 : i0 + bs_q][~ok] = rest
    return out_d, out_i


def search_nearest(
    xq: torch.Tensor,
    src: RowSource,
    center: torch.Tensor | None,
    metric: Metric,
    device: torch.device,
    tile_elems: int = TILE_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k = 1 without a top-K: (D float64 (nq,), ids int64 (nq,))."""
    nq = xq.shape[0]
    bs_q, bs_b = _block_sizes(nq, tile_elems, 1024)
    out_d = torch.empty(nq, dtype=torch.float64)
    out_i = torch.empty(nq, dtype=torch.int64)
    for i0 in range(0, nq, bs_q):
        x = xq[i0 : i0 + bs_q]
        xs = prepare(x.to(device), metric, center)
        best = torch.full((xs.shape[0],), math.inf, device=device)
        second = best.clone()
        arg = torch.zeros(xs.shape[0], dtype=torch.int64, device=device)
        radius2 = torch.zeros((), device=device)
        for r0, tile in _tiles(xs, src, center, metric, bs_b, radius2):
            m, a = tile.min(1)
            m2 = tile.scatter_(1, a.unsqueeze(1), math.inf).amin(1)  # the tile's second best
            better = m < best
            second = torch.where(better, torch.minimum(best, m2), torch.minimum(second, m))
            best, arg = torch.where(better, m, best), torch.where(better, a + r0, arg)
        # Provably the unique nearest when every other row scores beyond best + 2E.
        e2 = 2 * _error_bound(xs, radius2, metric)
        ok = second.double().cpu() > best.double().cpu() + e2
        rows = arg.cpu().unsqueeze(1)
        no_dead = torch.zeros_like(rows[ok], dtype=torch.bool)
        d_blk, i_blk = _rerank(x[ok].cpu(), rows[ok], no_dead, src, metric, 1)
        out_d[i0 : i0 + bs_q][ok], out_i[i0 : i0 + bs_q][ok] = d_blk[:, 0], i_blk[:, 0]
        if not bool(ok.all()):
            d_blk, i_blk = search_topk(x[~ok], src, center, metric, 1, device, 4 * tile_elems)
            out_d[i0 : i0 + bs_q][~ok], out_i[i0 : i0 + bs_q][~ok] = d_blk[:, 0], i_blk[:, 0]
    return out_d, out_i
