"""The candidate scans of an exact search, one class per kernel (`_exact` chains them).

A scan proposes, for each query, K candidate rows with their scan scores, a score no other
row beats (`beyond`) and the bound E_q on its scores' error (`_precision`). It proves nothing
itself: the driver proves and re-ranks (`Candidates.proven`). Scans:

- `NearestScan`: k = 1, torch tiles (`_scan.tiles`) in fp32 or bf16, a running best and second
  best (`_scan.update_best2`).
- `Int8NearestScan`: k = 1 on CPUs without native bf16, oneDNN's u8 x s8 GEMM (`_int8`).
- `FusedNearestScan`: k = 1 on a GPU, GEMM and selection in one Triton kernel (`_fused`).
- `TopkScan`: top-K of torch tiles, selected in faiss's heaps on a CPU (`_heap`) or by group
  minima (`_scan.scan_topk`).

Where things live: scans run on ``bank.device``; candidates stay there until proven; the
re-rank and the results are where the rows live (``bank.home``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from . import _fused, _int8
from ._precision import BF16, BF16_FUSED, Precision, choose, error_bound
from ._prepared import PreparedBank
from ._rerank import rerank
from ._rows import MatrixRows
from ._scan import SLABS, TOPK_SLABS, heap_tiles, scan_topk, tiles, update_best2

TILE_ELEMS = 1 << 21  # k = 1: 2048 queries x 1024 rows, measured fastest here
# top-k of 2 to 256 queries (bank-major), of one query, or in bf16: 1024 x 2048 at most; larger
# tiles leave the cache
TOPK_TILE_ELEMS = 1 << 21
# top-k into faiss's heaps (`_heap`): 1024 x 512 tiles (2 MiB, in the two cores' L2), the
# fastest of 2**18 to 2**21 elements on bench/exact.py's top-k case
HEAP_TILE_ELEMS = 1 << 19
HEAP_BANK_BLOCK = 512
HEAP_MARGIN = 8  # kept beyond k by a first scan into heaps
GPU_TILE_ELEMS = 1 << 29  # 32768 queries x 16384 rows: few kernels (bench/results/gpu.md)
GPU_BANK_BLOCK = 16384
FUSED_QUERIES = 1 << 18  # per launch of the fused kernel
HOST_CHUNK = 1 << 15  # queries per copy of the pipelined upload (`_upload`): 32 MiB at d = 256


@dataclass(frozen=True)
class Candidates:
    """What a scan proposes for the queries q0 .. q0 + nq - 1 of its input.

    rows (nq, K) int64 bank rows and scores (nq, K) float64 ascending ('smaller is nearer';
    +inf: a dead row or an unfilled slot), on the scan's device; beyond (nq,) float64: no row
    outside `rows` scores below it; bound (nq,) float64: E_q. complete: `rows` hold every row
    of the bank. scanned False: the scan passed these queries on unscanned (all unproven)."""

    q0: int
    rows: torch.Tensor
    scores: torch.Tensor
    beyond: torch.Tensor
    bound: torch.Tensor
    label: str
    complete: bool = False
    scanned: bool = True

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def proven(self, k: int) -> torch.Tensor:
        """(nq,) bool: the re-rank of `rows` is exact. Each scan score is within E_q of the
        true one, so every true top-k row scores at most tau + 2 E_q (tau the k-th smallest
        kept score): if nothing outside scores below that, the kept rows hold them all."""
        if not self.scanned:
            return torch.zeros(len(self), dtype=torch.bool, device=self.rows.device)
        ok = self.beyond > self.scores[:, k - 1] + 2 * self.bound
        return ok | self.complete


class CandidateScan(Protocol):
    """One kernel's candidate scan (module docstring)."""

    precision: Precision

    def place(self, xq: torch.Tensor) -> torch.Tensor:
        """The queries where this scan reads them (and the re-rank and later scans after it)."""
        ...

    def scan(self, xq: torch.Tensor, k: int) -> Iterator[Candidates]:
        """Candidates for xq (nq, d) float32 (as `place` gave it), block by block in order."""
        ...

    def rerank(
        self, xq: torch.Tensor, which: torch.Tensor | None, c: Candidates, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (D float64 (m, k), ids (m, k)) on `bank.home` of the proven queries
        xq[which] (None: all of the block) from their candidates."""
        ...


def _on_device(xq: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Queries from host memory onto a GPU in one copy (block by block, pageable copies and
    the re-rank's gathers from host memory cost more than the search; bench/results/gpu.md)."""
    if device.type != "cuda" or xq.device.type != "cpu":
        return xq
    return (xq.pin_memory() if xq.numel() >= 1 << 22 else xq).to(device, non_blocking=True)


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _upload(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Host queries x into out (on a GPU) on a copy stream; the current stream waits for it.
    The search of one chunk then overlaps the copy of the next."""
    stream, current = _copy_stream(out.device), torch.cuda.current_stream(out.device)
    staged = x.pin_memory()
    with torch.cuda.stream(stream):
        out.copy_(staged, non_blocking=True)
    current.wait_stream(stream)
    return out


def block_sizes(
    nq: int, bank: PreparedBank, tile_elems: int, bs_b: int, slabs: int
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
        wide = min(tile_elems // bs_q, bank.n, tile_elems // bank.d)
        bs_b = max(bs_b, -(-wide // slabs) * slabs)
    return bs_q, bs_b


class _Scan:
    """What the scans share: the bank, the precision, placing queries and the re-rank."""

    def __init__(self, bank: PreparedBank, precision: Precision) -> None:
        self.bank, self.precision = bank, precision

    def place(self, xq: torch.Tensor) -> torch.Tensor:
        return _on_device(xq, self.bank.device)

    def rerank(
        self, xq: torch.Tensor, which: torch.Tensor | None, c: Candidates, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, home = self.bank, self.bank.home
        x = xq[c.q0 : c.q0 + len(c)]
        rows, dead = c.rows.to(home), c.scores.isinf().to(home)
        if which is not None:
            rows, dead = rows[which.to(home)], dead[which.to(home)]
        return rerank(x, which, rows, dead, b.src, b.metric, k)


def _nearest(
    q0: int,
    best: torch.Tensor,
    second: torch.Tensor,
    arg: torch.Tensor,
    e: torch.Tensor,
    label: str,
) -> Candidates:
    return Candidates(q0, arg[:, None], best.double()[:, None], second.double(), e, label)


class NearestScan(_Scan):
    """k = 1 in torch tiles (fp32 or bf16): a running best, second best and row per query.
    A bf16 scan on a CPU gives each block's candidates as soon as it is scanned (the driver
    drops bf16 for the rest where it proves too little); otherwise all come at the end, in
    one re-rank and, on a GPU, after one sync."""

    def scan(self, xq: torch.Tensor, k: int) -> Iterator[Candidates]:
        b, p = self.bank, self.precision
        per_block = not b.gpu and p.u_in > choose(b.device, "fp32").u_in
        nq, dev = xq.shape[0], b.device
        tile_elems = b.tile_elems or (GPU_TILE_ELEMS if b.gpu else TILE_ELEMS)
        bank_block = GPU_BANK_BLOCK if b.gpu else 1024
        bs_q, bs_b = block_sizes(nq, b, tile_elems, bank_block, SLABS)
        ng = -(-bs_b // SLABS)
        best = torch.full((nq,), math.inf, device=dev)
        second = torch.full((nq,), math.inf, device=dev)
        arg = torch.zeros(nq, dtype=torch.int64, device=dev)
        e = torch.empty(nq, dtype=torch.float64, device=dev)
        for i0 in range(0, nq, bs_q):
            q = slice(i0, i0 + bs_q)
            x = xq[q].to(dev)
            xs = b.metric.prepare(x, b.center, b.ws.get("xs", x.shape, device=dev))
            gbuf = b.ws.get("groups", (xs.shape[0], max(ng, bs_b // 2)), p.dtype, dev)
            for r0, tile in tiles(b, xs, bs_b, p):
                ngt = min(ng, -(-tile.shape[1] // SLABS))
                update_best2(tile, ngt, gbuf, r0, best[q], second[q], arg[q], b.gpu)
            e[q] = error_bound(xs, b.radius2, b.metric, p)
            if per_block:
                yield _nearest(i0, best[q], second[q], arg[q], e[q], f"{p.name} k=1")
        if not per_block:
            yield _nearest(0, best, second, arg, e, f"{p.name} k=1")


class Int8NearestScan(_Scan):
    """k = 1 in oneDNN's int8 GEMM (`_int8`), with its own bound. A block whose queries do
    not quantize (overflow) is passed on unscanned."""

    def __init__(self, bank: PreparedBank, precision: Precision, packed: _int8.PackedBank) -> None:
        super().__init__(bank, precision)
        self.packed = packed

    @classmethod
    def of(cls, bank: PreparedBank, precision: Precision, nq: int) -> Int8NearestScan | None:
        """The scan, or None where it is not worth it (few queries), not available, or not
        exact on this CPU for the shapes it would run. A bank snapshot keeps its packed copy
        (`State.packed`): packing 16384 x 256 costs 30 ms."""
        src = bank.src
        if bank.gpu or nq < _int8.MIN_QUERIES or not _int8.supported(bank.device, src.n, src.d):
            return None
        tile_elems = bank.tile_elems or TILE_ELEMS
        bs_q, _ = block_sizes(nq, bank, tile_elems, 1024, SLABS)
        rows = {-(-q // _int8.QUERY_ROWS) * _int8.QUERY_ROWS for q in (bs_q, nq % bs_q or bs_q)}

        def exact(widths: set[int]) -> bool:
            return all(_int8.exact_on(q, c, src.d) for q in rows for c in widths)

        # The usual width first: where the kernel fails, nothing is packed on every call.
        if not exact({min(_int8.BANK_ROWS, src.n)}):
            return None
        cache = src.packed
        packed = None if cache is None else cache.get(bank.metric.name)
        if packed is None:
            packed = _int8.pack(src, bank.metric, bank.center, bank.ws)
            if cache is not None:
                cache[bank.metric.name] = packed
        # every block width the scan will see (fewer rows at the end and where segments end)
        return cls(bank, precision, packed) if exact({len(b[2]) for b in packed.blocks}) else None

    def scan(self, xq: torch.Tensor, k: int) -> Iterator[Candidates]:
        b, packed = self.bank, self.packed
        nq, dev = xq.shape[0], b.device
        bs_q, bs_b = block_sizes(nq, b, b.tile_elems or TILE_ELEMS, 1024, SLABS)
        ng = -(-bs_b // SLABS)
        fp32 = choose(dev, "fp32")  # the int8 bound is on top of the fp32 GEMM's
        for i0 in range(0, nq, bs_q):
            x = xq[i0 : i0 + bs_q].to(dev)
            xs = b.metric.prepare(x, b.center, b.ws.get("xs", x.shape, device=dev))
            n = xs.shape[0]
            best = torch.full((n,), math.inf)
            second = torch.full((n,), math.inf)
            arg = torch.zeros(n, dtype=torch.int64)
            qz = _int8.quantize_queries(xs, b.metric, b.ws)
            if qz is None:
                inf = torch.full((n,), math.inf, dtype=torch.float64)
                yield Candidates(
                    i0, arg[:, None], inf[:, None], inf, inf, "int8 k=1", scanned=False
                )
                continue
            gbuf = b.ws.get("groups", (n, max(ng, bs_b // 2)), torch.float32, dev)
            for r0, tile in _int8.tiles(qz[0], qz[1], packed, n):
                update_best2(tile, min(ng, -(-tile.shape[1] // SLABS)), gbuf, r0, best, second, arg)
            base = error_bound(xs, packed.radius2, b.metric, fp32)
            e = _int8.error_bound(qz[1], qz[2], qz[3], packed, base)
            yield _nearest(i0, best, second, arg, e, "int8 k=1")


def fused_bound(prec: Precision) -> Precision:
    """The bound of the fused kernel's scores: its inputs' rounding, scores kept in fp32."""
    return BF16_FUSED if prec is BF16 else prec


class FusedNearestScan(_Scan):
    """k = 1 on a GPU in one Triton kernel (`_fused`): fp16 or bf16 operands, fp32 scores,
    never a score tile in memory. Queries from host memory are uploaded chunk by chunk, each
    searched once it is there; a matrix on the GPU is re-ranked by one kernel too."""

    def __init__(self, bank: PreparedBank, precision: Precision) -> None:
        super().__init__(bank, precision)
        self._host: torch.Tensor | None = None
        self.bound_prec = fused_bound(precision)

    def place(self, xq: torch.Tensor) -> torch.Tensor:
        dev = self.bank.device
        if xq.device.type == "cpu" and dev.type == "cuda":  # filled by `scan`, chunk by chunk
            self._host = xq
            _copy_stream(dev).wait_stream(torch.cuda.current_stream(dev))  # xd's last users
            return torch.empty(xq.shape, device=dev)
        self._host = None
        return _on_device(xq, dev)

    def scan(self, xq: torch.Tensor, k: int) -> Iterator[Candidates]:
        b, dev = self.bank, self.bank.device
        nq = xq.shape[0]
        # No tile to bound: one launch for up to 2**18 queries (many waves of the GPU's SMs,
        # no ragged last wave of a small launch), or one per chunk of an upload.
        bs_q = min(nq, HOST_CHUNK if self._host is not None else FUSED_QUERIES)
        _, bs_b = block_sizes(nq, b, b.tile_elems or GPU_TILE_ELEMS, GPU_BANK_BLOCK, SLABS)
        operand = _fused.bank_operand(b.src, bs_b, b.metric, b.center, self.bound_prec, dev, b.ws)
        best = torch.full((nq,), math.inf, device=dev)
        second = torch.full((nq,), math.inf, device=dev)
        arg = torch.zeros(nq, dtype=torch.int64, device=dev)
        e = torch.empty(nq, dtype=torch.float64, device=dev)
        for i0 in range(0, nq, bs_q):
            q = slice(i0, i0 + bs_q)
            x = _upload(self._host[q], xq[q]) if self._host is not None else xq[q].to(dev)
            # the kernel centres the queries itself; cosine needs them unit-norm first
            xk = b.metric.prepare(x, None) if b.metric.unit else x
            e[q] = _fused.nearest(xk, b.center, operand, b.metric, best[q], second[q], arg[q])
        self._host = None
        yield _nearest(0, best, second, arg, e, f"{self.precision.name} k=1")

    def rerank(
        self, xq: torch.Tensor, which: torch.Tensor | None, c: Candidates, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src = self.bank.src
        if not (isinstance(src, MatrixRows) and src.device.type == "cuda"):
            return super().rerank(xq, which, c, k)
        # A matrix on the GPU: the chosen rows scored in one kernel, not torch's float64 passes.
        x, rows = xq[c.q0 : c.q0 + len(c)], c.rows[:, 0]
        if which is not None:
            x, rows = x[which], rows[which]
        return _fused.exact(x, src.xb, rows, self.bank.metric)[:, None], rows[:, None]


class TopkScan(_Scan):
    """Top-K in torch tiles, K = k + margin (k + `HEAP_MARGIN` at least where faiss's heaps
    select: a heap's cost hardly depends on its size, and a wider first margin spares the
    next scan's pass over the whole bank)."""

    def __init__(self, bank: PreparedBank, precision: Precision, margin: int) -> None:
        super().__init__(bank, precision)
        self.margin = margin

    def scan(self, xq: torch.Tensor, k: int) -> Iterator[Candidates]:
        b, p = self.bank, self.precision
        nq, dev = xq.shape[0], b.device
        heaps = heap_tiles(nq, p, b.gpu) and nq > 1  # one query: wide tiles, few of them
        kk = min(b.n, k + (max(self.margin, HEAP_MARGIN) if heaps else self.margin))
        tile_elems = b.tile_elems or (
            GPU_TILE_ELEMS if b.gpu else HEAP_TILE_ELEMS if heaps else TOPK_TILE_ELEMS
        )
        block = GPU_BANK_BLOCK if b.gpu else HEAP_BANK_BLOCK if heaps else 2048
        bs_q, bs_b = block_sizes(nq, b, tile_elems, block, TOPK_SLABS)
        for i0 in range(0, nq, bs_q):
            x = xq[i0 : i0 + bs_q].to(dev)
            xs = b.metric.prepare(x, b.center, b.ws.get("xs", x.shape, device=dev))
            vals, rows = scan_topk(b, xs, kk, bs_b, p)
            vals, order = vals.sort(1)
            vals = vals.double()
            e = error_bound(xs, b.radius2, b.metric, p)
            yield Candidates(
                i0, rows.gather(1, order), vals, vals[:, -1], e, f"{p.name} k+{kk - k}", kk >= b.n
            )
