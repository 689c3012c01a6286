"""Exact k-NN by torch matmul expansion, equal to float64 brute force (ties: lowest id first).

1. Scan. float32 scores, blocked over queries (``bs_q``) and bank (``bs_b``) with a running top-K
   (K = k + margin): ``s = ||y||^2 - 2 x.y`` for l2 with both sides centred on the bank mean (the
   norm of x is constant per query, so it is left out), ``s = -x.y`` for ip and cosine.
2. Re-rank. The K kept rows are scored again in float64 by the direct formula (``sum((x-y)^2)``,
   ``x.y``, ``x.y / |x||y|``) and sorted by (distance, id).

Why this is exact, whatever the data: each float32 score is within ``E_q = c (|x_q| + R)^2`` of
its true value (R the bank radius around the centre, ``c = 2 (d + 8) u`` twice the textbook
dot-product rounding bound). With tau the k-th smallest kept score, every true top-k row (ties
included) scores at most ``tau + 2 E_q``. If the K-th kept score is above that, the kept rows hold
all of them and the float64 re-rank is exact. Otherwise (many near-ties, or large norms against
tiny gaps) the query falls back to a float64 scan of the whole bank. Centring on the mean is what
keeps R, and so E_q, small for data far from the origin.

k = 1 takes a cheaper scan: a running minimum per tile plus a count of scores within ``2 E_q`` of
it, instead of a top-K; a query whose minimum is not provably unique goes through the top-K path.

Scratch memory: the score tile is ``bs_q x bs_b`` float32 (``tile_elems`` elements, 2**22 by
default, 16 MiB), plus one same-sized temporary for the top-K or the comparison, plus the running
``bs_q x 2K`` state and re-rank chunks of at most 2**21 float64 elements (16 MiB). It does not grow
with nq x nb: about 50 MiB at the defaults.
"""

from __future__ import annotations

import math

import torch

from ._rows import RowSource, Stats, prepare
from ._validate import Metric

U32 = 2.0**-24
TILE_ELEMS = 1 << 22
RERANK_ELEMS = 1 << 21
MARGIN = 8


def _unit_roundoff(device: torch.device) -> float:
    # TF32 rounds the GEMM inputs to 10 mantissa bits; the bound must say so.
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11
    return U32


def _error_bound(xs: torch.Tensor, stats: Stats, metric: Metric) -> torch.Tensor:
    """E_q (nq,) float64: bound on |float32 score - true score| for every row of the bank."""
    d = xs.shape[1]
    c = 2.0 * (d + 8) * _unit_roundoff(xs.device)
    xn = torch.linalg.vector_norm(xs.double(), dim=1).cpu()
    if metric == "l2":
        e = c * (xn + stats.radius) ** 2
    elif metric == "ip":
        e = c * xn * stats.radius
    else:  # unit vectors; normalising each side adds about (d + 3) u more
        e = torch.full_like(xn, 2.0 * c)
    # A non-finite bound (float32 overflow) sends the query to the float64 scan.
    return torch.where(torch.isfinite(e), e, torch.full_like(e, math.inf))


def _scores(xs: torch.Tensor, y: torch.Tensor, metric: Metric) -> torch.Tensor:
    """float32 score tile (bq, nbk); smaller is nearer."""
    if metric == "l2":
        yn = (y * y).sum(1)
        return torch.addmm(yn.unsqueeze(0), xs, y.T, beta=1.0, alpha=-2.0)
    return -(xs @ y.T)


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
        dist = exact64(xq[i0 : i0 + qc], src.take(r), metric).masked_fill_(dead[i0 : i0 + qc], math.inf)
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
            best_d, best_i, _ = lex_topk(torch.cat([best_d, dist], 1), torch.cat([best_i, ids], 1), k)
        out_d[q], out_i[q] = best_d[0], best_i[0]
    return out_d, out_i


def _block_sizes(nq: int, nb: int, tile_elems: int) -> tuple[int, int]:
    bs_q = max(1, min(nq, 4096))
    bs_b = max(1024, tile_elems // bs_q)
    return bs_q, min(bs_b, max(nb, 1))


def _scan_topk(
    xs: torch.Tensor, src: RowSource, stats: Stats, metric: Metric, kk: int, bs_b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running float32 top-kk (scores, rows) of one query block; rows are global row numbers."""
    bq = xs.shape[0]
    vals = torch.empty(bq, 0, device=xs.device)
    rows = torch.empty(bq, 0, dtype=torch.int64, device=xs.device)
    for r0, y, dead in src.blocks(bs_b):
        tile = _scores(xs, prepare(y.to(xs.device), metric, stats.center), metric)
        if dead is not None:
            tile.masked_fill_(dead.to(xs.device).unsqueeze(0), math.inf)
        v, i = tile.topk(min(kk, tile.shape[1]), dim=1, largest=False, sorted=False)
        vals, rows = torch.cat([vals, v], 1), torch.cat([rows, i + r0], 1)
        if vals.shape[1] > kk:
            vals, j = vals.topk(kk, dim=1, largest=False, sorted=False)
            rows = rows.gather(1, j)
    return vals, rows


def search_topk(
    xq: torch.Tensor, src: RowSource, stats: Stats, metric: Metric, k: int, device: torch.device,
    tile_elems: int = TILE_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k: (D float64 (nq, k), ids int64 (nq, k)), D as 'smaller is nearer'."""
    nq = xq.shape[0]
    kk = min(src.n, k + MARGIN)
    bs_q, bs_b = _block_sizes(nq, src.n, tile_elems)
    out_d = torch.empty(nq, k, dtype=torch.float64)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    for i0 in range(0, nq, bs_q):
        x = xq[i0 : i0 + bs_q]
        xs = prepare(x.to(device), metric, stats.center)
        vals, rows = _scan_topk(xs, src, stats, metric, kk, bs_b)
        vals, order = vals.sort(1)
        vals, rows = vals.double().cpu(), rows.gather(1, order).cpu()
        thr = vals[:, k - 1] + 2 * _error_bound(xs, stats, metric)
        ok = (vals[:, -1] > thr) | (kk >= src.n)
        d_blk, i_blk = _rerank(x[ok].cpu(), rows[ok], vals[ok].isinf(), src, metric, k)
        out_d[i0 : i0 + bs_q][ok], out_i[i0 : i0 + bs_q][ok] = d_blk, i_blk
        if not bool(ok.all()):
            d_blk, i_blk = _scan64(x[~ok].cpu(), src, metric, k)
            out_d[i0 : i0 + bs_q][~ok], out_i[i0 : i0 + bs_q][~ok] = d_blk, i_blk
    return out_d, out_i


def search_nearest(
    xq: torch.Tensor, src: RowSource, stats: Stats, metric: Metric, device: torch.device,
    tile_elems: int = TILE_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k = 1 without a top-K: (D float64 (nq,), ids int64 (nq,))."""
    nq = xq.shape[0]
    bs_q, bs_b = _block_sizes(nq, src.n, tile_elems)
    out_d = torch.empty(nq, dtype=torch.float64)
    out_i = torch.empty(nq, dtype=torch.int64)
    for i0 in range(0, nq, bs_q):
        x = xq[i0 : i0 + bs_q]
        xs = prepare(x.to(device), metric, stats.center)
        e2 = (2 * _error_bound(xs, stats, metric)).to(device)
        mins, args, counts = [], [], []
        for r0, y, dead in src.blocks(bs_b):
            tile = _scores(xs, prepare(y.to(device), metric, stats.center), metric)
            if dead is not None:
                tile.masked_fill_(dead.to(device).unsqueeze(0), math.inf)
            m, a = tile.min(1)
            # Rounded up to float32, so the count can only err towards 'not unique'.
            thr = torch.nextafter((m.double() + e2).float(), torch.tensor(math.inf, device=device))
            counts.append((tile <= thr.unsqueeze(1)).sum(1))
            mins.append(m)
            args.append(a + r0)
        m_t, a_t, c_t = torch.stack(mins, 1), torch.stack(args, 1), torch.stack(counts, 1)
        tau, t_best = m_t.min(1)
        # Unique when the best tile has one score within 2E of its minimum and every other
        # tile's minimum is beyond tau + 2E.
        others = m_t.double().masked_fill(
            torch.nn.functional.one_hot(t_best, m_t.shape[1]).bool(), math.inf
        )
        ok = (c_t.gather(1, t_best[:, None])[:, 0] == 1) & (
            others.min(1).values > tau.double() + e2
        )
        ok = ok.cpu()
        rows = a_t.gather(1, t_best[:, None]).cpu()
        d_blk, i_blk = _rerank(x[ok].cpu(), rows[ok], torch.zeros_like(rows[ok], dtype=torch.bool), src, metric, 1)
        out_d[i0 : i0 + bs_q][ok], out_i[i0 : i0 + bs_q][ok] = d_blk[:, 0], i_blk[:, 0]
        if not bool(ok.all()):
            d_blk, i_blk = search_topk(x[~ok], src, stats, metric, 1, device, tile_elems)
            out_d[i0 : i0 + bs_q][~ok], out_i[i0 : i0 + bs_q][~ok] = d_blk[:, 0], i_blk[:, 0]
    return out_d, out_i
