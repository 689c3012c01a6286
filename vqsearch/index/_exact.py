"""Exact k-NN by torch matmul expansion, equal to float64 brute force (ties: lowest id first).

1. Scan (`_scan`). Candidate scores, blocked over queries (``bs_q``) and bank (``bs_b``) with a
   running top-K (K = k + 2; k + 8 where faiss's heaps keep it, `_heap`: row-major CPU tiles):
   ``s = ||y||^2 - 2 x.y`` for l2 with both sides centred on the bank mean (the norm of x is
   constant per query, so it is left out), ``s = -x.y`` for ip and cosine. The scan runs in
   bf16, int8 or fp32 (`_precision`: bf16 where the CPU or GPU runs it natively; for k = 1 on
   other CPUs int8, `_int8`, with a bound of its own). k = 1 keeps a running best and second
   best instead of a top-K.
2. Re-rank. The K kept rows are scored again in float64 by the direct formula (``sum((x-y)^2)``,
   ``x.y``, ``x.y / |x||y|``) and sorted by (distance, id).

Why this is exact, whatever the data: each scan score is within ``E_q`` of its true value
(`_precision.error_bound`: ``c (|x_q| + R)^2``, R the bank radius around the centre). With tau
the k-th smallest kept score, every true top-k row (ties included) scores at most ``tau + 2 E_q``.
If the K-th kept score is above that, the kept rows hold all of them and the float64 re-rank is
exact. Otherwise (near-ties, or large norms against tiny gaps) the query is scanned again: a
bf16 or int8 scan's leftovers in fp32, an fp32 scan's keeping k + 32 rows (k = 1: its near-ties
go through top-K), and what that cannot prove either by a float64 scan of the whole bank.
Centring on the mean is what keeps R, and so E_q, small for data far from the origin.

On a GPU, k = 1 with fp16 (or bf16) candidates runs the scan and the running best / second
best as one Triton kernel (`_fused`), which never writes a score tile; the proof is the same,
and the re-rank of a matrix on the GPU is one kernel. Queries from host memory are uploaded in
chunks that the kernel searches as they land (`_upload`).

Where things live: the scan runs on ``device``; the re-rank and the results are where the row
source keeps its rows (``src.device``, the CPU for a bank on disk), so a bank on the GPU is
searched without a round trip. On a GPU the whole search syncs with the host a few times, not
once per block or tile (`_scan.gpu_style`).

Scratch memory, per search, in a workspace reused by the next search (`_workspace`): the score
tile, ``bs_q x bs_b`` in the scan dtype (``tile_elems`` = 2**21 elements on a CPU: 8 MiB fp32,
4 MiB bf16; 2**29 on a GPU: 1 GiB bf16, 2 GiB fp32), the group minima (at most half a tile),
the prepared query block (``bs_q x d`` float32, plus its bf16 copy) and, for banks without a
cached prepared copy, one prepared bank block (at most ``tile_elems`` float32); re-rank chunks
of at most 2**16 float64 elements (512 KiB; 2**24 on a GPU). On a CPU at the defaults with
d = 256 that is under 24 MiB (tested); it does not grow with nq x nb. Two workspaces are kept
between searches.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Any

import torch

from . import _fused, _int8
from ._metric import Metric
from ._precision import (
    BF16,
    BF16_FUSED,
    FP16,
    INT8,
    WORTH_IT,
    Precision,
    choose,
    error_bound,
    record,
    resolve,
)
from ._rows import MatrixRows, RowSource, prepare
from ._scan import SLABS, TOPK_SLABS, gpu_style, heap_tiles, scan_topk, tiles, update_best2
from ._workspace import Workspace, borrow

TILE_ELEMS = 1 << 21  # k = 1: 2048 queries x 1024 rows, measured fastest here
# top-k of 2 to 256 queries (bank-major), of one query, or in bf16: 1024 x 2048 at most; larger
# tiles leave the cache
TOPK_TILE_ELEMS = 1 << 21
# top-k into faiss's heaps (`_heap`): 1024 x 512 tiles (2 MiB, in the two cores' L2). A sweep
# on the 2-core VM (200,000 x 128, 1000 queries, k = 10; faiss 0.48 s): 2**18/256 0.49 s,
# 2**19/512 0.45 s, 2**20/1024 0.54 s, 2**21/2048 0.61 s.
HEAP_TILE_ELEMS = 1 << 19
HEAP_BANK_BLOCK = 512
HEAP_MARGIN = 8  # kept beyond k by a first scan into heaps
RERANK_ELEMS = 1 << 16  # float64: 512 KiB chunks, kept in malloc's heaps (never mmapped)
GPU_TILE_ELEMS = 1 << 29  # 32768 queries x 16384 rows: few kernels (H200: 2**28 28 ms, 2**29 18)
GPU_BANK_BLOCK = 16384
GPU_RERANK_ELEMS = 1 << 24
FUSED_QUERIES = 1 << 18  # per launch of the fused kernel
MARGINS = (2, 32)  # kept beyond k by the first scan, then by a retry for unproven queries
CPU = torch.device("cpu")


def home(src: RowSource) -> torch.device:
    """Where the row source keeps its rows: the re-rank runs there and the results live there."""
    return getattr(src, "device", CPU)


def _empty(dev: torch.device, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer to no queries: D float64 (0, k), ids int64 (0, k)."""
    return (
        torch.empty(0, k, dtype=torch.float64, device=dev),
        torch.empty(0, k, dtype=torch.int64, device=dev),
    )


def _on_device(xq: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Queries from host memory onto a GPU in one copy (block by block, pageable copies and
    the re-rank's gathers from host memory cost more than the search). Measured on an H200
    for 268 MB: pageable 41 ms, pinned first 12.5 ms (`bench/results/gpu.md`)."""
    if device.type != "cuda" or xq.device.type != "cpu":
        return xq
    return (xq.pin_memory() if xq.numel() >= 1 << 22 else xq).to(device, non_blocking=True)


HOST_CHUNK = 1 << 15  # queries per copy of the pipelined upload (`_upload`): 32 MiB at d = 256


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _upload(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Host queries x into out (on a GPU) on a copy stream; the current stream waits for it.
    The search of one chunk then overlaps the copy of the next: for 262,144 x 256 queries
    the copy alone took 12.3 ms on an H200, pinned first, against a 5.6 ms kernel."""
    stream, current = _copy_stream(out.device), torch.cuda.current_stream(out.device)
    staged = x.pin_memory()
    with torch.cuda.stream(stream):
        out.copy_(staged, non_blocking=True)
    current.wait_stream(stream)
    return out


def exact64(x: torch.Tensor, y: torch.Tensor, metric: Metric) -> torch.Tensor:
    """`Metric.exact64`: float64 distance (smaller is nearer) of x (q, d) to y (q, m, d)."""
    return metric.exact64(x, y)


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
    which: torch.Tensor | None,
    rows: torch.Tensor,
    dead: torch.Tensor,
    src: RowSource,
    metric: Metric,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (D float64, ids) of the k best among the candidate rows (nq, K) of the queries
    xq[which] (which: (nq,) positions, gathered chunk by chunk rather than copied whole; None:
    all of xq). rows, dead and the results are on `home(src)`."""
    nq, kk = rows.shape
    dev = home(src)
    out_d = torch.empty(nq, k, dtype=torch.float64, device=dev)
    out_i = torch.empty(nq, k, dtype=torch.int64, device=dev)
    qc = max(1, (RERANK_ELEMS if dev.type == "cpu" else GPU_RERANK_ELEMS) // max(1, kk * src.d))
    which = None if which is None else which.to(xq.device)
    for i0 in range(0, nq, qc):
        r = rows[i0 : i0 + qc]
        x = (xq[i0 : i0 + qc] if which is None else xq[which[i0 : i0 + qc]]).to(dev)
        dist = exact64(x, src.take(r), metric).masked_fill_(dead[i0 : i0 + qc], math.inf)
        if kk == 1:  # the proven nearest: nothing to order
            out_d[i0 : i0 + qc], out_i[i0 : i0 + qc] = dist, src.ids(r)
            continue
        out_d[i0 : i0 + qc], out_i[i0 : i0 + qc], _ = lex_topk(dist, src.ids(r), k)
    return out_d, out_i


def _scan64(
    xq: torch.Tensor, src: RowSource, metric: Metric, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 brute force on the CPU, one query at a time: the fallback for unprovable
    queries. Results on `home(src)`."""
    xq = xq.cpu()
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
            ids = src.ids(torch.arange(r0, r0 + y.shape[0], device=y.device).unsqueeze(0))
            best_d, best_i, _ = lex_topk(
                torch.cat([best_d, dist], 1), torch.cat([best_i, ids.cpu()], 1), k
            )
        out_d[q], out_i[q] = best_d[0], best_i[0]
    return out_d.to(home(src)), out_i.to(home(src))


def _count(stats: Counter[str] | None, scan: str, scanned: int, proven: int) -> None:
    """Tally, per scan, the queries it scanned and those it proved (the rest went on)."""
    if stats is not None:
        stats[f"{scan} scanned"] += scanned
        stats[f"{scan} proven"] += proven


def _block_sizes(
    nq: int, src: RowSource, tile_elems: int, bs_b: int, slabs: int
) -> tuple[int, int]:
    """(bs_q, bs_b): bank blocks of the preferred size (a multiple of the slab count), the
    queries split into equal blocks of at most as many as fit in the tile (1000 queries: one
    block, not 992 and then 8 that stream the whole bank again for little work). Blocks of few
    queries get wider bank blocks: a tile costs some twenty small ops whatever its size (a
    one-vector request: one tile, not sixteen), as long as a block of bank rows stays under
    tile_elems elements (it is prepared in scratch)."""
    bs_b = max(slabs, min(bs_b, tile_elems // 16) // slabs * slabs)
    nq = max(nq, 1)
    n_blocks = -(-nq // max(1, tile_elems // bs_b))
    bs_q = -(-nq // n_blocks)
    if bs_q * bs_b < tile_elems:
        wide = min(tile_elems // bs_q, src.n, tile_elems // src.d)
        bs_b = max(bs_b, -(-wide // slabs) * slabs)
    return bs_q, bs_b


def _put(
    out: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, res: tuple[torch.Tensor, ...]
) -> None:
    """out_d[idx], out_i[idx] = res, whatever devices idx and res are on."""
    idx = idx.to(out[0].device)
    out[0][idx], out[1][idx] = res[0].to(out[0].device), res[1].to(out[0].device)


def _search_topk(
    xq: torch.Tensor,
    src: RowSource,
    center: torch.Tensor | None,
    metric: Metric,
    k: int,
    device: torch.device,
    tile_elems: int | None = None,
    margins: tuple[int, ...] = MARGINS,
    precision: str | Precision = "auto",
    stats: Counter[str] | None = None,
    ws: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k: (D float64 (nq, k), ids int64 (nq, k)) on `home(src)`, D as 'smaller is
    nearer'. Queries the first scan cannot prove exact are scanned again: after bf16 in fp32,
    after fp32 keeping more rows, and those still unproven by the float64 scan."""
    ws = ws or Workspace()
    nq, dev = xq.shape[0], home(src)
    if nq == 0:  # an empty batch is valid input: an empty answer of the same shape
        return _empty(dev, k)
    if not margins:
        _count(stats, "float64", len(xq), len(xq))
        return _scan64(xq, src, metric, k)
    gpu = gpu_style(device)
    xq = _on_device(xq, device)
    hints = getattr(src, "hints", None)
    prec = resolve(precision, device, k, hints)
    fp32 = choose(device, "fp32")
    heaps = heap_tiles(nq, prec, gpu) and nq > 1  # one query: wide tiles, few of them
    # A heap's cost hardly depends on its size: a wider first margin spares the retry's pass
    # over the whole bank (1 of 1000 queries unproven at k + 2 in bench/exact.py case (b)).
    kk = min(src.n, k + (max(margins[0], HEAP_MARGIN) if heaps else margins[0]))
    tile_elems = tile_elems or (
        GPU_TILE_ELEMS if gpu else HEAP_TILE_ELEMS if heaps else TOPK_TILE_ELEMS
    )
    block = GPU_BANK_BLOCK if gpu else HEAP_BANK_BLOCK if heaps else 2048
    bs_q, bs_b = _block_sizes(nq, src, tile_elems, block, TOPK_SLABS)
    out = (
        torch.empty(nq, k, dtype=torch.float64, device=dev),
        torch.empty(nq, k, dtype=torch.int64, device=dev),
    )
    in_fp32: list[torch.Tensor] = []  # unproven by a bf16 scan: scanned again in fp32
    wider: list[torch.Tensor] = []  # unproven by fp32: scanned again keeping more rows
    for i0 in range(0, nq, bs_q):
        x = xq[i0 : i0 + bs_q]
        xs = prepare(x.to(device), metric, center, ws.get("xs", x.shape, device=device))
        radius2 = torch.zeros((), device=device)
        vals, rows = scan_topk(xs, src, center, metric, kk, bs_b, radius2, prec, ws, gpu)
        vals, order = vals.sort(1)
        vals, rows = vals.double(), rows.gather(1, order)
        thr = vals[:, k - 1] + 2 * error_bound(xs, radius2, metric, prec)
        ok = ((vals[:, -1] > thr) | (kk >= src.n)).to(dev)
        n_ok = int(ok.sum())
        _count(stats, f"{prec.name} k+{kk - k}", len(ok), n_ok)
        record(hints, prec, k, n_ok / len(ok))
        which = ok.nonzero()[:, 0]
        rows, dead = rows.to(dev)[which], vals.isinf().to(dev)[which]
        _put(out, which + i0, _rerank(x, which, rows, dead, src, metric, k))
        if n_ok < len(ok):
            (in_fp32 if prec.u_in > fp32.u_in else wider).append((~ok).nonzero()[:, 0] + i0)
            if n_ok < WORTH_IT * len(ok):
                prec = fp32
    # The unproven of all blocks together: one more scan, not one per block.
    for redo, (p, m) in ((in_fp32, (fp32, margins)), (wider, (prec, margins[1:]))):
        if redo:
            idx = torch.cat(redo)
            _put(
                out,
                idx,
                search_topk(
                    xq[idx.to(xq.device)], src, center, metric, k, device, None, m, p, stats
                ),
            )
    return out


def _int8_bank(
    src: RowSource,
    nq: int,
    bs_q: int,
    metric: Metric,
    center: torch.Tensor | None,
    device: torch.device,
    ws: Workspace,
    gpu: bool,
) -> _int8.PackedBank | None:
    """The bank packed for the int8 scan, or None where that scan is not worth it (few
    queries), not available, or not exact on this CPU for the shapes the search will use.
    A bank snapshot (`State.packed`) keeps its packed copy: packing 16384 x 256 costs 30 ms."""
    if gpu or nq < _int8.MIN_QUERIES or not _int8.supported(device, src.n, src.d):
        return None
    rows = {-(-q // _int8.QUERY_ROWS) * _int8.QUERY_ROWS for q in (bs_q, nq % bs_q or bs_q)}

    def exact(widths: set[int]) -> bool:
        return all(_int8.exact_on(q, c, src.d) for q in rows for c in widths)

    # The usual width first: where the kernel fails, nothing is packed on every call.
    if not exact({min(_int8.BANK_ROWS, src.n)}):
        return None
    cache = getattr(src, "packed", None)
    packed = None if cache is None else cache.get(metric.name)
    if packed is None:
        packed = _int8.pack(src, metric, center, ws)
        if cache is not None:
            cache[metric.name] = packed
    # every block width the scan will see (fewer rows at the end and where segments end)
    return packed if exact({len(b[2]) for b in packed.blocks}) else None


def _fused_bound(prec: Precision) -> Precision:
    """The bound of the fused kernel's scores: its inputs' rounding, scores kept in fp32."""
    return BF16_FUSED if prec is BF16 else prec


def _search_nearest(
    xq: torch.Tensor,
    src: RowSource,
    center: torch.Tensor | None,
    metric: Metric,
    device: torch.device,
    tile_elems: int | None = None,
    precision: str | Precision = "auto",
    stats: Counter[str] | None = None,
    ws: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k = 1 without a top-K: (D float64 (nq,), ids int64 (nq,)) on `home(src)`.

    Every block's running (best, second best, row) and error bound stay on the device; which
    queries are proven is read once, at the end (a CPU also reads it per block, to drop bf16
    early on a bank where it proves too little)."""
    ws = ws or Workspace()
    nq, dev, gpu = xq.shape[0], home(src), gpu_style(device)
    if nq == 0:
        none_d, none_i = _empty(dev, 1)
        return none_d[:, 0], none_i[:, 0]
    hints = getattr(src, "hints", None)
    fusable = gpu and _fused.available(device, src.n, src.d)
    prec = resolve(precision, device, 1, hints, fusable)
    fp32 = choose(device, "fp32")
    tile_elems = tile_elems or (GPU_TILE_ELEMS if gpu else TILE_ELEMS)
    bs_q, bs_b = _block_sizes(nq, src, tile_elems, GPU_BANK_BLOCK if gpu else 1024, SLABS)
    ng = -(-bs_b // SLABS)
    best = torch.full((nq,), math.inf, device=device)
    second = torch.full((nq,), math.inf, device=device)
    arg = torch.zeros(nq, dtype=torch.int64, device=device)
    e2 = torch.empty(nq, dtype=torch.float64, device=device)
    used: list[tuple[int, Precision]] = []  # (first query, scan precision) of each block
    fused = None
    if fusable and prec in (BF16, FP16):
        fused = _fused.bank_operand(src, bs_b, metric, center, _fused_bound(prec), device, ws)
        # No tile to bound: one launch for up to 2**18 queries (2048 programs: many waves of
        # the GPU's SMs, no ragged last wave of a small launch), or per chunk of an upload.
        bs_q = min(nq, FUSED_QUERIES)
    # From host memory into the fused kernel: chunk by chunk, each searched once it is there.
    upload = fused is not None and xq.device.type == "cpu" and device.type == "cuda"
    if upload:
        bs_q = min(nq, HOST_CHUNK)
        xd = torch.empty(xq.shape, device=device)
        _copy_stream(device).wait_stream(torch.cuda.current_stream(device))  # xd's last users
    else:
        xq = xd = _on_device(xq, device)
    packed = _int8_bank(src, nq, bs_q, metric, center, device, ws, gpu) if prec is INT8 else None
    if prec is INT8 and packed is None:
        prec = fp32
    for i0 in range(0, nq, bs_q):
        q = slice(i0, i0 + bs_q)
        x = _upload(xq[q], xd[q]) if upload else xq[q].to(device)
        b, s, a = best[i0 : i0 + bs_q], second[i0 : i0 + bs_q], arg[i0 : i0 + bs_q]
        p = prec
        if fused is not None:  # the kernel centres the queries itself
            xk = prepare(x, metric, None) if metric.unit else x
            e2[i0 : i0 + bs_q] = 2 * _fused.nearest(xk, center, fused, metric, b, s, a)
            used.append((i0, p))
            continue
        xs = prepare(x, metric, center, ws.get("xs", x.shape, device=device))
        qz = _int8.quantize_queries(xs, metric, ws) if packed is not None and p is INT8 else None
        p = fp32 if p is INT8 and qz is None else p
        groups = (xs.shape[0], max(ng, bs_b // 2))
        if qz is not None and packed is not None:
            gbuf = ws.get("groups", groups, torch.float32, device)  # int8 tiles are float32
            for r0, tile in _int8.tiles(qz[0], qz[1], packed, xs.shape[0]):
                update_best2(tile, min(ng, -(-tile.shape[1] // SLABS)), gbuf, r0, b, s, a)
            e = _int8.error_bound(
                qz[1], qz[2], qz[3], packed, error_bound(xs, packed.radius2, metric, fp32)
            )
        else:
            gbuf = ws.get("groups", groups, p.dtype, device)
            radius2 = torch.zeros((), device=device)
            for r0, tile in tiles(xs, src, center, metric, bs_b, radius2, p, ws, gpu):
                update_best2(tile, min(ng, -(-tile.shape[1] // SLABS)), gbuf, r0, b, s, a, gpu)
            e = error_bound(xs, radius2, metric, p)
        # Provably the unique nearest when every other row scores beyond best + 2E.
        e2[i0 : i0 + bs_q] = 2 * e
        used.append((i0, p))
        if not gpu and p.u_in > fp32.u_in:
            proven = float((s.double() > b.double() + e2[i0 : i0 + bs_q]).float().mean())
            if proven < WORTH_IT:
                prec = fp32
    xq = xd
    ok_dev = second.double() > best.double() + e2
    ok = ok_dev.cpu()  # the one sync of a GPU search
    low = torch.zeros(nq, dtype=torch.bool)  # scanned in a precision coarser than fp32
    for (i0, p), end in zip(used, [i for i, _ in used[1:]] + [nq], strict=True):
        n_ok = int(ok[i0:end].sum())
        _count(stats, f"{p.name} k=1", end - i0, n_ok)
        record(hints, p, 1, n_ok / (end - i0))
        low[i0:end] = p.u_in > fp32.u_in
    # A matrix on the GPU: the chosen rows scored in one kernel, not torch's float64 passes.
    on_gpu = fused is not None and dev.type == "cuda"
    direct = src.xb if on_gpu and isinstance(src, MatrixRows) else None
    if bool(ok.all()):  # the usual case: no gathers, no index copies
        if direct is not None:
            return _fused.exact(xq, direct, arg, metric), arg
        rows = arg.to(dev).unsqueeze(1)
        d1, i1 = _rerank(xq, None, rows, torch.zeros_like(rows, dtype=torch.bool), src, metric, 1)
        return d1[:, 0], i1[:, 0]
    which = ok_dev.nonzero()[:, 0]
    rows = arg[which].to(dev).unsqueeze(1)
    if direct is not None:
        d1, i1 = _fused.exact(xq[which], direct, rows[:, 0], metric)[:, None], rows
    else:
        d1, i1 = _rerank(xq, which, rows, torch.zeros_like(rows, dtype=torch.bool), src, metric, 1)
    out = (
        torch.empty(nq, dtype=torch.float64, device=dev),
        torch.empty(nq, dtype=torch.int64, device=dev),
    )
    _put(out, which, (d1[:, 0], i1[:, 0]))
    # The unproven of all blocks together: one more scan, not one per block.
    if bool((~ok & low).any()):
        idx = (~ok & low).nonzero()[:, 0]
        _put(
            out,
            idx,
            search_nearest(
                xq[idx.to(xq.device)], src, center, metric, device, tile_elems, fp32, stats
            ),
        )
    if bool((~ok & ~low).any()):
        idx = (~ok & ~low).nonzero()[:, 0]
        d_k, i_k = search_topk(
            xq[idx.to(xq.device)], src, center, metric, 1, device, None, MARGINS, fp32, stats
        )
        _put(out, idx, (d_k[:, 0], i_k[:, 0]))
    return out


def search_topk(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`_search_topk` with a borrowed workspace (see `_workspace`)."""
    with borrow() as ws:
        return _search_topk(*args, **{**kwargs, "ws": ws})


def search_nearest(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`_search_nearest` with a borrowed workspace (see `_workspace`)."""
    with borrow() as ws:
        return _search_nearest(*args, **{**kwargs, "ws": ws})


def exact_search(
    xq: torch.Tensor,
    src: RowSource,
    center: torch.Tensor | None,
    metric: Metric,
    k: int,
    device: torch.device,
    tile_elems: int | None = None,
    precision: str | Precision = "auto",
    stats: Counter[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one k dispatch: D float64 (nq, k) as 'smaller is nearer', ids int64 (nq, k). k = 1
    runs the nearest-code scan (no top-k), larger k the top-k scan."""
    if k == 1:
        d1, i1 = search_nearest(
            xq, src, center, metric, device, tile_elems, precision=precision, stats=stats
        )
        return d1[:, None], i1[:, None]
    return search_topk(
        xq, src, center, metric, k, device, tile_elems, precision=precision, stats=stats
    )
