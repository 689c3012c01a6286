"""Exact k-NN by torch matmul expansion, equal to float64 brute force (ties: lowest id first).

The driver of a chain of candidate scans (`_scans`, one class per kernel):

1. Scan. A scan proposes K candidates per query from cheap scores, blocked over queries and
   bank: ``s = ||y||^2 - 2 x.y`` for l2 with both sides centred on the bank mean (the norm of
   x is constant per query, so it is left out), ``s = -x.y`` for ip and cosine (`_metric`), in
   bf16, int8 or fp32 (`_precision`). k = 1 keeps a running best and second best instead of a
   top-K.
2. Prove. Each scan score is within ``E_q`` of its true value (`_precision.error_bound`:
   ``c (|x_q| + R)^2``, R the bank radius around the centre). With tau the k-th smallest kept
   score, every true top-k row (ties included) scores at most ``tau + 2 E_q``: if no row left
   out scores below that, the kept rows hold all of them (`_scans.Candidates.proven`).
3. Re-rank. The kept rows of proven queries are scored again in float64 by the direct formula
   and sorted by (distance, id) (`_rerank`).
4. Pass on. The unproven go to the next scan of the chain (`_chain`): a bf16 or int8 scan's to
   fp32, an fp32 nearest scan's to fp32 top-K (k + 2, its near-ties), a top-K's to one keeping
   k + 32, and what none of them proves to a float64 scan of the whole bank. A coarse scan that
   proves under half of a block (`WORTH_IT`) passes the rest of its queries on unscanned.

Centring on the mean is what keeps R, and so E_q, small for data far from the origin. Adding a
scan or a precision is one class in `_scans` and one line in `_chain`.

Where things live: scans run on ``device``; the re-rank and the results are where the row
source keeps its rows (``src.device``, the CPU for a bank on disk), so a bank on the GPU is
searched without a round trip. On a GPU a search syncs with the host a few times, not once per
block or tile (`_scan.gpu_style`).

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

from collections import Counter

import torch

from . import _fused
from ._metric import Metric
from ._precision import BF16, FP16, INT8, WORTH_IT, Precision, choose, record, resolve
from ._prepared import PreparedBank
from ._rerank import scan64
from ._rows import RowSource
from ._scan import gpu_style
from ._scans import (
    CandidateScan,
    FusedNearestScan,
    Int8NearestScan,
    NearestScan,
    TopkScan,
)
from ._workspace import Workspace, borrow

MARGINS = (2, 32)  # kept beyond k by a first top-K scan, then by the next for the unproven


def _chain(bank: PreparedBank, nq: int, k: int, precision: str | Precision) -> list[CandidateScan]:
    """The scans a search of nq queries runs, in order; the float64 scan follows them all."""
    hints, dev = bank.src.hints, bank.device
    fp32 = choose(dev, "fp32")
    tail: list[CandidateScan] = [TopkScan(bank, fp32, MARGINS[0]), TopkScan(bank, fp32, MARGINS[1])]
    if k == 1:
        fusable = bank.gpu and _fused.available(dev, bank.n, bank.d)
        prec = resolve(precision, dev, 1, hints, fusable)
        first: list[CandidateScan] = []
        if fusable and prec in (BF16, FP16):
            first = [FusedNearestScan(bank, prec)]
        elif prec is INT8:
            int8 = Int8NearestScan.of(bank, prec, nq)
            first = [int8] if int8 is not None else []
        elif prec is not fp32 and prec.u_in > fp32.u_in:
            first = [NearestScan(bank, prec)]
        return [*first, NearestScan(bank, fp32), *tail]
    prec = resolve(precision, dev, k, hints)
    coarse = [TopkScan(bank, prec, MARGINS[0])] if prec.u_in > fp32.u_in else []
    return [*coarse, *tail]


def _search(
    xq: torch.Tensor, bank: PreparedBank, k: int, chain: list[CandidateScan]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the chain over xq (nq, d): (D float64 (nq, k), ids int64 (nq, k)) on `bank.home`."""
    nq, home = xq.shape[0], bank.home
    out_d = torch.empty(nq, k, dtype=torch.float64, device=home)
    out_i = torch.empty(nq, k, dtype=torch.int64, device=home)
    fp32 = choose(bank.device, "fp32")
    todo: torch.Tensor | None = None  # the queries (positions in xq) still unproven; None: all
    x = xq
    for scan in chain:
        x = scan.place(x)
        left: list[torch.Tensor] = []  # positions in x, unproven by this scan
        done = 0
        for c in scan.scan(x, k):
            m, done = len(c), c.q0 + len(c)
            ok = c.proven(k).to(home)
            n_ok = int(ok.sum())
            if c.scanned:
                bank.count(c.label, m, n_ok)
                record(bank.src.hints, scan.precision, k, n_ok / max(m, 1))
            if n_ok:
                which = None if n_ok == m else ok.nonzero()[:, 0]
                d, i = scan.rerank(x, which, c, k)
                at = torch.arange(c.q0, done, device=home) if which is None else which + c.q0
                pos = at if todo is None else todo[at]
                out_d[pos], out_i[pos] = d.to(home), i.to(home)
            if n_ok < m:
                left.append((~ok).nonzero()[:, 0] + c.q0)
            # A coarse scan that proves too little costs more than it saves: the rest go on.
            if c.scanned and scan.precision.u_in > fp32.u_in and n_ok < WORTH_IT * m:
                break
        if done < x.shape[0]:
            left.append(torch.arange(done, x.shape[0], device=home))
        if not left:
            return out_d, out_i
        here = torch.cat(left)
        todo = here if todo is None else todo[here]
        x = x[here.to(x.device)]
    bank.count("float64", len(x), len(x))
    assert todo is not None
    d, i = scan64(x, bank.src, bank.metric, k)
    out_d[todo], out_i[todo] = d, i
    return out_d, out_i


def _exact_search(
    xq: torch.Tensor,
    bank: PreparedBank,
    k: int,
    precision: str | Precision,
) -> tuple[torch.Tensor, torch.Tensor]:
    if xq.shape[0] == 0:  # an empty batch is valid input: an empty answer of the same shape
        return (
            torch.empty(0, k, dtype=torch.float64, device=bank.home),
            torch.empty(0, k, dtype=torch.int64, device=bank.home),
        )
    return _search(xq, bank, k, _chain(bank, xq.shape[0], k, precision))


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
    ws: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of xq (nq, d) float32 in src: D float64 (nq, k) as 'smaller is nearer', ids
    int64 (nq, k), on `src.device`. k = 1 runs the nearest-code scans (no top-K), larger k the
    top-K scans. The search borrows a workspace (`_workspace`) unless given one."""
    if ws is None:
        with borrow() as borrowed:
            return exact_search(
                xq, src, center, metric, k, device, tile_elems, precision, stats, borrowed
            )
    bank = PreparedBank(src, metric, center, device, gpu_style(device), ws, tile_elems, stats)
    return _exact_search(xq, bank, k, precision)
