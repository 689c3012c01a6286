"""The candidate scan of `_exact`: score tiles and the running selections folded from them.

A tile is ``s = ||y||^2 - 2 x.y`` (l2, both sides centred) or ``s = -x.y`` (ip, cosine) for a
block of queries against a block of bank rows, in the scan's precision; smaller is nearer.

Selection without a full sort of each tile (a `topk` or an argmin over the tile costs more than
the GEMM that made it): the tile's columns are cut into G slabs of ng columns, and the minimum
over the slabs gives the minimum of each strided group ``{j, j + ng, j + 2 ng, ...}``. Only the
best groups are opened.

Two styles, one arithmetic (`gpu_style`). On a CPU, tiles are cache-sized and only the queries a
tile can improve ("hot": few, past the first tiles) are updated; finding them costs a host sync
per tile, which is free there. On a GPU, a sync or a kernel launch costs more than the arithmetic
of a small tile: tiles are large, every query is updated on every tile with fixed-shape ops (no
sync), and the squared norms ride in the GEMM as one more column (``[-2x, 1] . [y, |y|^2]``)
rather than as an `addmm` bias, which CUDA would first copy into the whole output tile.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ._heap import Heaps
from ._metric import Metric
from ._precision import Precision
from ._prepared import PreparedBank
from ._rows import prepared_blocks
from ._workspace import Workspace

SLABS = 8  # k = 1: groups of 8 strided columns
TOPK_SLABS = 32
# fp32 CPU tiles of at most this many queries are computed bank-major: MKL's GEMM runs
# y (nbk, d) @ x.T (d, bq) 1.2-2x faster than x @ y.T when bq is small (4..256 queries
# against 8192 rows, 2 cores: bench/results/exact_small.md)
BANK_MAJOR_QUERIES = 256


def gpu_style(device: torch.device) -> bool:
    """Whether the scan runs the GPU way (module docstring); tests force it on the CPU too."""
    return device.type != "cpu"


def bank_major_block(bq: int, prec: Precision, gpu: bool) -> bool:
    """Whether `tiles` computes a block of bq (padded) queries bank-major: fp32 on a CPU, 2 to
    `BANK_MAJOR_QUERIES` queries."""
    return not gpu and prec.dtype == torch.float32 and 1 < bq <= BANK_MAJOR_QUERIES


def heap_tiles(bq: int, prec: Precision, gpu: bool) -> bool:
    """Whether `scan_topk` selects from this block's tiles with faiss's heaps (`_heap`): on a
    CPU, fp32 tiles computed row-major."""
    fp32_cpu = not gpu and prec.dtype == torch.float32
    return fp32_cpu and not bank_major_block(bq, prec, gpu)


def _queries_for_gemm(
    xs: torch.Tensor, metric: Metric, prec: Precision, gpu: bool, ws: Workspace
) -> torch.Tensor:
    """The left GEMM operand (bqp, da) in the scan dtype. CPU: the queries, bf16 ones padded to
    a power of two (oneDNN keeps a compiled primitive of MiBs per shape: padding lets varied
    batch sizes share a few). GPU: -2 x and a column of ones for l2, -x otherwise (scaling by
    a power of two is exact, so the rounding and its bound are those of x)."""
    bq, d = xs.shape
    low = prec.dtype != xs.dtype
    if not gpu:
        if not low:
            return xs
        bqp = 1 << (bq - 1).bit_length() if bq < 1024 else bq
        xg = ws.get("xs low", (bqp, d), prec.dtype, xs.device)
        xg[:bq].copy_(xs)
        xg[bq:].zero_()
        return xg
    if not metric.norm_bias:
        return torch.mul(
            xs, metric.query_scale, out=ws.get("xs low", (bq, d), prec.dtype, xs.device)
        )
    da = -(-(d + 1) // 8) * 8  # rows 16-byte aligned, as the tensor cores want them
    xg = ws.get("xs aug", (bq, da), prec.dtype, xs.device)
    torch.mul(xs, metric.query_scale, out=xg[:, :d])
    xg[:, d] = 1.0
    xg[:, d + 1 :] = 0.0
    return xg


def tiles(
    bank: PreparedBank, xs: torch.Tensor, bs_b: int, prec: Precision
) -> Iterator[tuple[int, torch.Tensor]]:
    """(r0, score tile (bq, nbk) in prec.dtype) of the prepared queries xs (bq, d) over the
    bank, dead rows at +inf; each tile is valid until the next is yielded (they share a buffer).
    The rows' squared norms go to `bank.saw` (the bank radius of the error bound). A tile of few
    fp32 queries on a CPU is the transposed view of a bank-major (nbk, bq) product
    (`BANK_MAJOR_QUERIES`)."""
    bq, d = xs.shape
    metric, gpu, ws = bank.metric, bank.gpu, bank.ws
    xg = _queries_for_gemm(xs, metric, prec, gpu, ws)
    bqp = xg.shape[0]
    transposed = bank_major_block(bqp, prec, gpu)
    # One buffer for every tile of the scan: fresh 8-32 MiB tiles would each be page-faulted in.
    buf = ws.get("tile", (bqp * bs_b,), prec.dtype, xs.device)
    blocks = prepared_blocks(bank.src, bs_b, metric, bank.center, xs.device, prec.dtype, ws)
    for r0, yp, yn, dead in blocks:
        bank.saw(yn)
        full = buf[: bqp * yp.shape[0]].view(bqp, yp.shape[0])
        if transposed:  # bank-major: the (nbk, bq) product, yielded as its (bq, nbk) view
            full_t = buf[: bqp * yp.shape[0]].view(yp.shape[0], bqp)
            if metric.norm_bias:
                torch.addmm(yn.unsqueeze(1), yp, xg.T, alpha=metric.query_scale, out=full_t)
            else:
                torch.mm(yp, xg.T, out=full_t).neg_()
            full = full_t.T
        elif gpu and metric.norm_bias:
            ya = ws.get("rows aug", (yp.shape[0], xg.shape[1]), prec.dtype, xs.device)
            ya[:, :d].copy_(yp)
            ya[:, d].copy_(yn)
            ya[:, d + 1 :] = 0.0
            torch.mm(xg, ya.T, out=full)
        elif gpu:
            torch.mm(xg, yp.T, out=full)
        elif metric.norm_bias:
            bias = yn.to(prec.dtype).unsqueeze(0)
            torch.addmm(bias, xg, yp.T, alpha=metric.query_scale, out=full)
        else:
            torch.mm(xg, yp.T, out=full).neg_()
        tile = full[:bq]
        if dead is not None:
            tile.masked_fill_(dead.unsqueeze(0), math.inf)
        yield r0, tile


def bank_major(tile: torch.Tensor) -> bool:
    """Whether the (bq, w) tile is the transposed view of a contiguous (w, bq) product."""
    return not tile.is_contiguous() and tile.T.is_contiguous()


def group_min(tile: torch.Tensor, ng: int, out: torch.Tensor) -> torch.Tensor:
    """(bq, ng) minimum of each strided column group {j, j + ng, ...} of the tile; out is a
    scratch buffer of at least bq x max(ng, w / 2) elements."""
    bq, w = tile.shape
    if w % ng == 0 and bank_major(tile):
        # the groups are rows of the (w, bq) product: a reduction over its leading axis
        g = out.view(-1)[: ng * bq].view(ng, bq)
        return torch.amin(tile.T.view(w // ng, ng, bq), 0, out=g).T
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


def member_scores(
    tile: torch.Tensor, qs: torch.Tensor, groups: torch.Tensor, ng: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32 (n, m), columns (n, m)) of every member of the groups (n, ...) of the
    tile rows qs (n,); columns past the tile score +inf."""
    w = tile.shape[1]
    cols = groups.unsqueeze(-1) + ng * torch.arange(-(-w // ng), device=groups.device)
    absent = (cols >= w).reshape(len(qs), -1)
    cols = cols.clamp_max(w - 1).reshape(len(qs), -1)
    if bank_major(tile):  # tile[q, c] is element c * bq + q of the (w, bq) product
        flat = torch.take(tile.T, cols * tile.shape[0] + qs.unsqueeze(1))
    else:
        flat = torch.take(tile, qs.unsqueeze(1) * w + cols)
    return flat.float().masked_fill_(absent, math.inf), cols


def _best_in_tile(
    tile: torch.Tensor, qs: torch.Tensor, g: torch.Tensor, ng: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For tile rows qs with group minima g (n, ng; overwritten): (best score, its column,
    best score of every other column), float32 scores."""
    mq, gq = g.min(1)
    outside = g.scatter_(1, gq.unsqueeze(1), math.inf).amin(1)  # best of the other groups
    vals, cols = member_scores(tile, qs, gq, ng)
    j = vals.argmin(1, keepdim=True)
    inside = vals.scatter_(1, j, math.inf).amin(1)  # the winner's group, but the winner
    return mq.float(), cols.gather(1, j).squeeze(1), torch.minimum(outside.float(), inside)


def update_best2(
    tile: torch.Tensor,
    ng: int,
    gbuf: torch.Tensor,
    r0: int,
    best: torch.Tensor,
    second: torch.Tensor,
    arg: torch.Tensor,
    gpu: bool = False,
) -> None:
    """Fold a tile into the running (best score, its row, second best score) of each query.
    Ties across tiles keep the earlier row and leave second == best (unproven, re-ranked)."""
    gm = group_min(tile, ng, gbuf)
    if gpu:
        m, col, runner = _best_in_tile(tile, torch.arange(len(best), device=tile.device), gm, ng)
        hot = m < best
        torch.where(hot, torch.minimum(best, runner), torch.minimum(second, m), out=second)
        torch.where(hot, col + r0, arg, out=arg)
        torch.where(hot, m, best, out=best)
        return
    m = gm.amin(1).float()
    hot = m < best
    torch.minimum(second, torch.where(hot, best, m), out=second)
    qs = hot.nonzero().squeeze(1)
    if not len(qs):
        return
    mq, col, runner = _best_in_tile(tile, qs, gm.index_select(0, qs), ng)
    second[qs] = torch.minimum(second[qs], runner)
    best[qs], arg[qs] = mq, col + r0


def scan_topk(
    bank: PreparedBank, xs: torch.Tensor, kk: int, bs_b: int, prec: Precision
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-kk (float32 scores, rows) of one block of prepared queries xs (bq, d); rows
    are global row numbers.

    Past the first tiles most queries have nothing to gain from a tile: none of its group
    minima beats their kk-th best so far. On a CPU only those ("hot") open groups and merge;
    on a GPU every query does (opening its kk best groups covers its top kk of the tile).
    Row-major fp32 CPU tiles go to faiss's compiled heaps instead (`heap_tiles`)."""
    bq, gpu = xs.shape[0], bank.gpu
    if heap_tiles(bq, prec, gpu):
        heaps = Heaps(bq, kk)
        for r0, tile in tiles(bank, xs, bs_b, prec):
            heaps.add(tile, r0)
        return heaps.result()
    ng = -(-bs_b // TOPK_SLABS)
    gbuf = bank.ws.get("groups", (bq, max(ng, bs_b // 2)), prec.dtype, xs.device)
    vals = torch.full((bq, kk), math.inf, device=xs.device)
    rows = torch.zeros(bq, kk, dtype=torch.int64, device=xs.device)
    tau = torch.full((bq,), math.inf, device=xs.device)  # the kk-th best so far
    every = torch.arange(bq, device=xs.device)
    for r0, tile in tiles(bank, xs, bs_b, prec):
        ngt = min(ng, -(-tile.shape[1] // TOPK_SLABS))
        gm = group_min(tile, ngt, gbuf)
        if gpu:
            qs, o = every, kk
        else:
            beats = (gm < tau.unsqueeze(1).to(gm.dtype)).sum(1)
            qs = beats.nonzero().squeeze(1)
            if not len(qs):
                continue
            # Opening the o best groups of each hot row covers every group that beats its tau.
            o = min(kk, int(beats.max()))
        g = gm if gpu else gm.index_select(0, qs)
        _, gi = g.topk(min(o, ngt), dim=1, largest=False, sorted=False)
        v, c = member_scores(tile, qs, gi, ngt)
        v, c = torch.cat([vals[qs], v], 1), torch.cat([rows[qs], c + r0], 1)
        v, j = v.topk(kk, dim=1, largest=False, sorted=False)
        vals[qs], rows[qs], tau[qs] = v, c.gather(1, j), v.amax(1)
    return vals, rows
