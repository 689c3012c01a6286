"""Exact k-NN by torch matmul expansion, equal to float64 brute force (ties: lowest id first).

1. Scan. Candidate scores, blocked over queries (``bs_q``) and bank (``bs_b``) with a running
   top-K (K = k + 2): ``s = ||y||^2 - 2 x.y`` for l2 with both sides centred on the bank mean
   (the norm of x is constant per query, so it is left out), ``s = -x.y`` for ip and cosine.
   The scan runs in bf16 or fp32 (`_precision`: bf16 where the CPU or GPU runs it natively).
2. Re-rank. The K kept rows are scored again in float64 by the direct formula (``sum((x-y)^2)``,
   ``x.y``, ``x.y / |x||y|``) and sorted by (distance, id).

Why this is exact, whatever the data: each scan score is within ``E_q`` of its true value
(`_precision.error_bound`: ``c (|x_q| + R)^2``, R the bank radius around the centre). With tau
the k-th smallest kept score, every true top-k row (ties included) scores at most ``tau + 2 E_q``.
If the K-th kept score is above that, the kept rows hold all of them and the float64 re-rank is
exact. Otherwise (near-ties, or large norms against tiny gaps) the query is scanned again: a bf16
scan's leftovers in fp32, an fp32 scan's keeping k + 32 rows, and what that cannot prove either
by a float64 scan of the whole bank. Centring on the mean is what keeps R, and so E_q, small for
data far from the origin.

Selection without a full sort of each tile (a `topk` or an argmin over the tile costs more than
the GEMM that made it): the tile's columns are cut into G slabs of ng columns, and the minimum
over the slabs (elementwise, G - 1 vector ops) gives the minimum of each strided group
``{j, j + ng, j + 2 ng, ...}``. Only the best groups are opened. k = 1 keeps a running best and
second best (per tile: the best group, its best member, and the best score outside that member);
a query whose best is not provably unique (second best within ``2 E_q``) goes through top-K.

Scratch memory, per search, in a workspace reused by the next search (`_workspace`): the score
tile, ``bs_q x bs_b`` in the scan dtype (``tile_elems`` = 2**21 elements: 8 MiB fp32, 4 MiB
bf16), the group minima (at most half a tile), the prepared query block (``bs_q x d`` float32,
plus its bf16 copy) and, for banks without a cached prepared copy, one prepared bank block
(at most ``tile_elems`` float32); re-rank chunks of at most 2**16 float64 elements (512 KiB).
At the defaults with d = 256 that is under 24 MiB (tested); it does not grow with nq x nb.
Two workspaces are kept between searches.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from ._precision import WORTH_IT, Precision, choose, error_bound, record, resolve
from ._rows import RowSource, prepare, prepared_blocks
from ._validate import Metric
from ._workspace import Workspace, borrow

TILE_ELEMS = 1 << 21  # k = 1: 2048 queries x 1024 rows, measured fastest here
TOPK_TILE_ELEMS = 1 << 21  # top-k: 1024 queries x 2048 rows; larger tiles leave the cache
SLABS = 8  # k = 1: groups of 8 strided columns
TOPK_SLABS = 32
RERANK_ELEMS = 1 << 16  # float64: 512 KiB chunks, under the service's 1 MiB mmap threshold
MARGINS = (2, 32)  # kept beyond k by the first scan, then by a retry for unproven queries


def _tiles(
    xs: torch.Tensor,
    src: RowSource,
    center: torch.Tensor | None,
    metric: Metric,
    bs_b: int,
    radius2: torch.Tensor,
    prec: Precision,
    ws: Workspace,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(r0, score tile (bq, nbk) in prec.dtype) over the bank, smaller is nearer, dead rows at
    +inf; each tile is valid until the next is yielded (they share a buffer). Updates radius2
    (0-d float32) in place to the largest squared norm of a prepared row."""
    bq, low = xs.shape[0], prec.dtype != xs.dtype
    # A CPU bf16 GEMM goes through oneDNN, which keeps a compiled primitive (MiBs) per shape:
    # padding the query count to a power of two lets varied batch sizes share a few shapes.
    bqp = 1 << (bq - 1).bit_length() if low and bq < 1024 else bq
    # One buffer for every tile of the scan: fresh 8-32 MiB tiles would each be page-faulted in.
    buf = ws.get("tile", (bqp * bs_b,), prec.dtype, xs.device)
    xg = xs
    if low:
        xg = ws.get("xs low", (bqp, xs.shape[1]), prec.dtype, xs.device)
        xg[:bq].copy_(xs)
        xg[bq:].zero_()
    blocks = prepared_blocks(src, bs_b, metric, center, xs.device, prec.dtype, ws)
    for r0, yp, yn, dead in blocks:
        if yn.numel():
            torch.maximum(radius2, yn.max(), out=radius2)
        full = buf[: bqp * yp.shape[0]].view(bqp, yp.shape[0])
        if metric == "l2":
            bias = yn.to(prec.dtype).unsqueeze(0)
            torch.addmm(bias, xg, yp.T, beta=1.0, alpha=-2.0, out=full)
        else:
            torch.mm(xg, yp.T, out=full).neg_()
        tile = full[:bq]
        if dead is not None:
            tile.masked_fill_(dead.unsqueeze(0), math.inf)
        yield r0, tile


def _group_min(tile: torch.Tensor, ng: int, out: torch.Tensor) -> torch.Tensor:
    """(bq, ng) minimum of each strided column group {j, j + ng, ...} of the tile; out is a
    scratch buffer of at least bq x max(ng, w / 2) elements."""
    bq, w = tile.shape
    if w % ng == 0 and (ng >= 64 or tile.dtype == torch.float32):
        # A reduction over the middle axis: vectorised along the rows, about 2x the halving.
        return torch.amin(tile.view(bq, w // ng, ng), 1, out=out.view(-1)[: bq * ng].view(bq, ng))
    h = w // 2
    if w % ng == 0 and (w // ng) & (w // ng - 1) == 0 and h >= ng:
        # Halving: log2(G) vector ops instead of G - 1 (each op has a fixed cost of ~10 us).
        m = torch.minimum(tile[:, :h], tile[:, h:], out=out[:, :h])
        while h > ng:
            h //= 2
            m = torch.minimum(m[:, :h], m[:, h : 2 * h], out=out[:, :h])
        return m
    m = out[:, :ng]
    m.copy_(tile[:, :ng])
    for c0 in range(ng, w, ng):
        c1 = min(c0 + ng, w)
        torch.minimum(m[:, : c1 - c0], tile[:, c0:c1], out=m[:, : c1 - c0])
    return m


def _members(groups: torch.Tensor, ng: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns (..., G) of the given groups, clamped into the tile, and which do not exist."""
    cols = groups.unsqueeze(-1) + ng * torch.arange(-(-w // ng), device=groups.device)
    return cols.clamp_max(w - 1), cols >= w


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
    xq: torch.Tensor,
    which: torch.Tensor,
    rows: torch.Tensor,
    dead: torch.Tensor,
    src: RowSource,
    metric: Metric,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (D float64, ids) of the k best among the candidate rows (nq, K) of the queries
    xq[which] (which: (nq,) positions, gathered chunk by chunk rather than copied whole)."""
    nq, kk = rows.shape
    out_d = torch.empty(nq, k, dtype=torch.float64)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    qc = max(1, RERANK_ELEMS // max(1, kk * src.d))
    for i0 in range(0, nq, qc):
        r = rows[i0 : i0 + qc]
        x = xq[which[i0 : i0 + qc]].cpu()
        dist = exact64(x, src.take(r), metric).masked_fill_(dead[i0 : i0 + qc], math.inf)
        if kk == 1:  # the proven nearest: nothing to order
            out_d[i0 : i0 + qc], out_i[i0 : i0 + qc] = dist, src.ids(r)
            continue
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


def _count(stats: Counter[str] | None, scan: str, scanned: int, proven: int) -> None:
    """Tally, per scan, the queries it scanned and those it proved (the rest went on)."""
    if stats is not None:
        stats[f"{scan} scanned"] += scanned
        stats[f"{scan} proven"] += proven


def _block_sizes(
    nq: int, src: RowSource, tile_elems: int, bs_b: int, slabs: int
) -> tuple[int, int]:
    """(bs_q, bs_b): bank blocks of the preferred size (a multiple of the slab count), as many
    queries as fit in the tile. Few queries get wider bank blocks: a tile costs some twenty
    small ops whatever its size (a one-vector request: one tile, not sixteen), as long as a
    block of bank rows stays under tile_elems elements (it is prepared in scratch)."""
    bs_b = max(slabs, min(bs_b, tile_elems // 16) // slabs * slabs)
    if nq * bs_b < tile_elems:
        wide = min(tile_elems // max(nq, 1), src.n, tile_elems // src.d)
        bs_b = max(bs_b, -(-wide // slabs) * slabs)
    return max(1, min(nq, tile_elems // bs_b)), bs_b


def _open_groups(
    tile: torch.Tensor, qs: torch.Tensor, gm: torch.Tensor, o: int, ng: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the tile rows qs: (scores float32, columns) of every member of their o groups with
    the smallest minima gm (n, ng). The o smallest of a row are among them: its o best groups
    hold o distinct minima no larger than anything in the groups left out."""
    _, gi = gm.topk(min(o, ng), dim=1, largest=False, sorted=False)
    return _member_scores(tile, qs, gi, ng)


def _member_scores(
    tile: torch.Tensor, qs: torch.Tensor, groups: torch.Tensor, ng: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32 (n, m), columns (n, m)) of every member of the groups (n, ...) of the
    tile rows qs (n,); columns past the tile score +inf."""
    w = tile.shape[1]
    cols, absent = _members(groups, ng, w)
    cols, absent = cols.reshape(len(qs), -1), absent.reshape(len(qs), -1)
    vals = torch.take(tile, qs.unsqueeze(1) * w + cols).float().masked_fill_(absent, math.inf)
    return vals, cols


def _update_best2(
    tile: torch.Tensor,
    ng: int,
    gbuf: torch.Tensor,
    r0: int,
    best: torch.Tensor,
    second: torch.Tensor,
    arg: torch.Tensor,
) -> None:
    """Fold a tile into the running (best score, its row, second best score) of each query.
    Only queries whose best the tile beats ("hot": few, past the first tiles) open a group."""
    gm = _group_min(tile, ng, gbuf)
    m = gm.amin(1).float()
    hot = m < best
    torch.minimum(second, torch.where(hot, best, m), out=second)
    qs = hot.nonzero().squeeze(1)
    if not len(qs):
        return
    g = gm.index_select(0, qs)
    mq, gq = g.min(1)
    outside = g.scatter_(1, gq.unsqueeze(1), math.inf).amin(1)  # best of the other groups
    vals, cols = _member_scores(tile, qs, gq, ng)
    j = vals.argmin(1, keepdim=True)
    inside = vals.scatter_(1, j, math.inf).amin(1)  # the winner's group, but the winner
    second[qs] = torch.minimum(second[qs], torch.minimum(outside.float(), inside))
    best[qs], arg[qs] = mq.float(), cols.gather(1, j).squeeze(1) + r0


def _scan_topk(
    xs: torch.Tensor,
    src: RowSource,
    center: torch.Tensor | None,
    metric: Metric,
    kk: int,
    bs_b: int,
    radius2: torch.Tensor,
    prec: Precision,
    ws: Workspace,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-kk (float32 scores, rows) of one query block; rows are global row numbers.

    Past the first tiles most queries have nothing to gain from a tile: none of its group
    minima beats their kk-th best so far. Only the others ("hot") open groups and merge."""
    bq = xs.shape[0]
    ng = -(-bs_b // TOPK_SLABS)
    gbuf = ws.get("groups", (bq, max(ng, bs_b // 2)), prec.dtype, xs.device)
    vals = torch.full((bq, kk), math.inf, device=xs.device)
    rows = torch.zeros(bq, kk, dtype=torch.int64, device=xs.device)
    tau = torch.full((bq,), math.inf, device=xs.device)  # the kk-th best so far
    for r0, tile in _tiles(xs, src, center, metric, bs_b, radius2, prec, ws):
        ngt = min(ng, -(-tile.shape[1] // TOPK_SLABS))
        gm = _group_min(tile, ngt, gbuf)
        beats = (gm < tau.unsqueeze(1).to(gm.dtype)).sum(1)
        qs = beats.nonzero().squeeze(1)
        if not len(qs):
            continue
        # Opening the o best groups of each hot row covers every group that beats its tau.
        o = min(kk, int(beats.max()))
        v, c = _open_groups(tile, qs, gm.index_select(0, qs), o, ngt)
        v, c = torch.cat([vals[qs], v], 1), torch.cat([rows[qs], c + r0], 1)
        v, j = v.topk(kk, dim=1, largest=False, sorted=False)
        vals[qs], rows[qs], tau[qs] = v, c.gather(1, j), v.amax(1)
    return vals, rows


def _search_topk(
    xq: torch.Tensor,
    src: RowSource,
    center: torch.Tensor | None,
    metric: Metric,
    k: int,
    device: torch.device,
    tile_elems: int = TOPK_TILE_ELEMS,
    margins: tuple[int, ...] = MARGINS,
    precision: str | Precision = "auto",
    stats: Counter[str] | None = None,
    ws: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k: (D float64 (nq, k), ids int64 (nq, k)), D as 'smaller is nearer'.
    Queries the first scan cannot prove exact are scanned again: after bf16 in fp32, after fp32
    keeping more rows, and those still unproven by the float64 scan."""
    ws = ws or Workspace()
    nq = xq.shape[0]
    if not margins:
        _count(stats, "float64", len(xq), len(xq))
        return _scan64(xq.cpu(), src, metric, k)
    hints = getattr(src, "hints", None)
    prec = resolve(precision, device, k, hints)
    fp32 = choose(device, "fp32")
    kk = min(src.n, k + margins[0])
    bs_q, bs_b = _block_sizes(nq, src, tile_elems, 2048, TOPK_SLABS)
    out_d = torch.empty(nq, k, dtype=torch.float64)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    in_fp32: list[torch.Tensor] = []  # unproven by a bf16 scan: scanned again in fp32
    wider: list[torch.Tensor] = []  # unproven by fp32: scanned again keeping more rows
    for i0 in range(0, nq, bs_q):
        x = xq[i0 : i0 + bs_q]
        xs = prepare(x.to(device), metric, center, ws.get("xs", x.shape, device=device))
        radius2 = torch.zeros((), device=device)
        vals, rows = _scan_topk(xs, src, center, metric, kk, bs_b, radius2, prec, ws)
        vals, order = vals.sort(1)
        vals, rows = vals.double().cpu(), rows.gather(1, order).cpu()
        thr = vals[:, k - 1] + 2 * error_bound(xs, radius2, metric, prec)
        ok = (vals[:, -1] > thr) | (kk >= src.n)
        _count(stats, f"{prec.name} k+{kk - k}", len(ok), int(ok.sum()))
        record(hints, prec, k, float(ok.float().mean()))
        d_blk, i_blk = _rerank(x, ok.nonzero()[:, 0], rows[ok], vals[ok].isinf(), src, metric, k)
        out_d[i0 : i0 + bs_q][ok], out_i[i0 : i0 + bs_q][ok] = d_blk, i_blk
        if not bool(ok.all()):
            (in_fp32 if prec.u_in > fp32.u_in else wider).append((~ok).nonzero()[:, 0] + i0)
            if float(ok.float().mean()) < WORTH_IT:
                prec = fp32
    # The unproven of all blocks together: one more scan, not one per block.
    for redo, (p, m) in ((in_fp32, (fp32, margins)), (wider, (prec, margins[1:]))):
        if redo:
            idx = torch.cat(redo)
            out_d[idx], out_i[idx] = search_topk(
                xq[idx], src, center, metric, k, device, tile_elems, m, p, stats
            )
    return out_d, out_i


def _search_nearest(
    xq: torch.Tensor,
    src: RowSource,
    center: torch.Tensor | None,
    metric: Metric,
    device: torch.device,
    tile_elems: int = TILE_ELEMS,
    precision: str | Precision = "auto",
    stats: Counter[str] | None = None,
    ws: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k = 1 without a top-K: (D float64 (nq,), ids int64 (nq,))."""
    ws = ws or Workspace()
    nq = xq.shape[0]
    hints = getattr(src, "hints", None)
    prec = resolve(precision, device, 1, hints)
    fp32 = choose(device, "fp32")
    bs_q, bs_b = _block_sizes(nq, src, tile_elems, 1024, SLABS)
    out_d = torch.empty(nq, dtype=torch.float64)
    out_i = torch.empty(nq, dtype=torch.int64)
    in_fp32: list[torch.Tensor] = []  # unproven by a bf16 scan: scanned again in fp32
    by_topk: list[torch.Tensor] = []  # unproven by fp32 (near-ties): the top-K path
    for i0 in range(0, nq, bs_q):
        x = xq[i0 : i0 + bs_q]
        xs = prepare(x.to(device), metric, center, ws.get("xs", x.shape, device=device))
        ng = -(-bs_b // SLABS)
        gbuf = ws.get("groups", (xs.shape[0], max(ng, bs_b // 2)), prec.dtype, device)
        best = torch.full((xs.shape[0],), math.inf, device=device)
        second = best.clone()
        arg = torch.zeros(xs.shape[0], dtype=torch.int64, device=device)
        radius2 = torch.zeros((), device=device)
        for r0, tile in _tiles(xs, src, center, metric, bs_b, radius2, prec, ws):
            ngt = min(ng, -(-tile.shape[1] // SLABS))
            _update_best2(tile, ngt, gbuf, r0, best, second, arg)
        # Provably the unique nearest when every other row scores beyond best + 2E.
        e2 = 2 * error_bound(xs, radius2, metric, prec)
        ok = second.double().cpu() > best.double().cpu() + e2
        _count(stats, f"{prec.name} k=1", len(ok), int(ok.sum()))
        record(hints, prec, 1, float(ok.float().mean()))
        rows = arg.cpu().unsqueeze(1)
        no_dead = torch.zeros_like(rows[ok], dtype=torch.bool)
        d_blk, i_blk = _rerank(x, ok.nonzero()[:, 0], rows[ok], no_dead, src, metric, 1)
        out_d[i0 : i0 + bs_q][ok], out_i[i0 : i0 + bs_q][ok] = d_blk[:, 0], i_blk[:, 0]
        if not bool(ok.all()):
            (in_fp32 if prec.u_in > fp32.u_in else by_topk).append((~ok).nonzero()[:, 0] + i0)
            if float(ok.float().mean()) < WORTH_IT:
                prec = fp32
    # The unproven of all blocks together: one more scan, not one per block.
    if in_fp32:
        idx = torch.cat(in_fp32)
        out_d[idx], out_i[idx] = search_nearest(
            xq[idx], src, center, metric, device, tile_elems, fp32, stats
        )
    if by_topk:
        idx = torch.cat(by_topk)
        d_k, i_k = search_topk(
            xq[idx], src, center, metric, 1, device, TOPK_TILE_ELEMS, MARGINS, fp32, stats
        )
        out_d[idx], out_i[idx] = d_k[:, 0], i_k[:, 0]
    return out_d, out_i


def search_topk(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`_search_topk` with a borrowed workspace (see `_workspace`)."""
    with borrow() as ws:
        return _search_topk(*args, **{**kwargs, "ws": ws})


def search_nearest(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`_search_nearest` with a borrowed workspace (see `_workspace`)."""
    with borrow() as ws:
        return _search_nearest(*args, **{**kwargs, "ws": ws})
