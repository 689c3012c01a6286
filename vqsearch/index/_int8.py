"""int8 candidate scores for k = 1 on CPUs without native bf16 (AVX2 only).

There fp32 GEMM is the whole cost of a nearest-code search and bf16 is emulated; oneDNN's
u8 x s8 GEMM with int32 sums runs at about twice the fp32 rate (210 against 105 GOP/s for a
2048 x 1024 x 256 tile on this project's 2-core EPYC). So, as with bf16 (`_precision`), a
cheaper scan proposes and the float64 re-rank decides; only the bound differs.

Operands. The queries' GEMM side ``X = -2 x`` (l2; ``-x`` for ip and cosine, a power-of-two
scaling: exact) is quantized per block, ``X^ = sx (q - 64)`` with q in [1, 127] (u8, zero point
64); each bank row per row, ``y^_j = s_j w_j`` with w in [-127, 127] (s8). Seven-bit queries
keep every u8 x s8 pair sum of AVX2's vpmaddubsw under 2**15 (2 * 127 * 127), so no
implementation saturates; `exact_on` checks the kernel once per shape against an exact
reference on extreme values (a kernel that halved weights or saturated would fail it) and the
scan falls back to fp32 where it fails.

The bound, per query, over every bank row j (``|.|_1`` and ``|.|`` the 1- and 2-norms):

    |X.y_j - X^.y^_j| <= |X - X^|_inf |y_j|_1 + |X^|_1 |y_j - y^_j|_inf
                      <= dx * L1 + |X^|_1 * dy

with dx = sx / 2 and dy = max_j s_j / 2 (each widened for the fp32 scaling, `ROUNDING`),
L1 = max_j |y_j|_1. The integer sums are exact (|sum| <= 64 * 127 * d < 2**24 for d <= 2064,
beyond that one conversion rounding, covered below); the fp32 scaling, the norm bias and the
sum post-op round a few times: 8 u32 (|X^| R^ + R^2). On top comes what an exact fp32 GEMM of
the prepared operands is allowed (`_precision.error_bound` for fp32: the centring and the
squared norms), so the whole is an upper bound on |scan score - true score|.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ._metric import Metric
from ._precision import TINY, U32
from ._rows import RowSource, prepared_blocks
from ._workspace import Workspace

ZERO_POINT = 64
X_LEVELS = 63  # q - 64 in [-63, 63]
W_LEVELS = 127
ROUNDING = 0.5 + 2.0**-14  # |v - s round(v / s)| / s: the fp32 scaling errs by < 128 * 2**-23
QUERY_ROWS = 256  # query blocks are padded to a multiple: few kernel shapes, few checks
PACK_ROWS = 2048  # the query block size oneDNN is told to expect when packing the bank
BANK_ROWS = 1024  # rows per packed block (the k = 1 scan's fp32 tile width)
MIN_QUERIES = 512  # below this the quantization and packing cost more than they save
MAX_BANK_ELEMS = 1 << 26  # the packed bank is a copy: 64 MiB at most


@dataclass(frozen=True)
class PackedBank:
    """The bank quantized per row and packed for oneDNN, block by block, with what the bound
    needs: L1 = max |y_j|_1, dy = max_j s_j * ROUNDING, radius2 = max |y_j|^2 (float32)."""

    blocks: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]
    l1: float
    dy: float
    radius2: torch.Tensor
    d: int


def _op() -> object | None:
    onednn = getattr(torch.ops, "onednn", None)
    return getattr(onednn, "qlinear_pointwise", None) if onednn is not None else None


def supported(device: torch.device, n: int, d: int) -> bool:
    """Whether this torch can run the int8 scan here at all (the kernel check comes later)."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and _op() is not None
        and n * d <= MAX_BANK_ELEMS
    )


def _quantize_rows(y: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(round(y / s) as float, s (rows,), the largest s of a non-zero row): s = max |y_j| /
    levels per row, 1 for zero rows (quantized exactly: they take no part in the bound)."""
    s = y.abs().amax(1) / levels
    top = float(s.max()) if len(s) else 0.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(y / s.unsqueeze(1)).clamp_(-levels, levels), s, top


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_prepack(w.to(torch.int8), [PACK_ROWS, w.shape[1]])


def _scores(
    qx: torch.Tensor,
    sx: float,
    qw: torch.Tensor,
    s: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """(bq, nbk) float32: sx * s_j * sum (q - 64) w_j + bias_j, one oneDNN call."""
    return torch.ops.onednn.qlinear_pointwise(
        qx, sx, ZERO_POINT, qw, s, _zeros(s.shape[0]), bias, 1.0, 0, torch.float32, "none", [], ""
    )


@functools.cache
def _zeros(n: int) -> torch.Tensor:
    """The weights' zero points (symmetric: all 0), one tensor per width, not one per tile."""
    return torch.zeros(n, dtype=torch.int64)


@functools.cache
def exact_on(bq: int, nbk: int, d: int) -> bool:
    """Whether oneDNN's kernel for this shape computes the integer sums exactly and scales
    them within 8 u32: checked on extreme values (every pair sum at its largest, both signs,
    odd weights) against an fp32 GEMM of the integers, exact here (sums < 2**24)."""
    if d > 2064 or _op() is None:
        return False
    g = torch.Generator().manual_seed(0)
    q = torch.randint(1, 128, (bq, d), generator=g)
    q[:, ::2] = torch.where(q[:, ::2] > 64, 127, 1)
    q[0] = 127
    w = torch.randint(-W_LEVELS, W_LEVELS + 1, (nbk, d), generator=g) | 1
    w[0], w[-1] = W_LEVELS, -W_LEVELS
    s = torch.rand(nbk, generator=g) + 0.5
    bias = torch.randn(nbk, generator=g)
    sx = 0.75
    try:
        out = _scores(q.to(torch.uint8), sx, _pack(w), s, bias).double()
    except RuntimeError:
        return False
    sums = torch.mm((q - ZERO_POINT).float(), w.float().T).double()
    want = sums * sx * s.double() + bias.double()
    tol = 8 * U32 * (sums.abs() * sx * s.double() + bias.double().abs()) + TINY
    return bool(((out - want).abs() <= tol).all())


def pack(src: RowSource, metric: Metric, center: torch.Tensor | None, ws: Workspace) -> PackedBank:
    """The whole bank as int8 blocks of BANK_ROWS rows (fewer where a bank's segments end):
    (r0, packed weights, scales, bias, dead); bias is the float32 squared norm for l2 (the
    score is |y|^2 - 2 x.y), None otherwise. One width whatever the batch size, so that a
    snapshot keeps one packed copy."""
    blocks = []
    l1 = dy = 0.0
    radius2 = torch.zeros(())
    cpu = torch.device("cpu")
    blocks_of = prepared_blocks(src, BANK_ROWS, metric, center, cpu, torch.float32, ws)
    for r0, yp, yn, dead in blocks_of:
        w, s, top = _quantize_rows(yp, W_LEVELS)
        l1 = max(l1, float(yp.abs().sum(1).max()) * (1 + yp.shape[1] * U32))
        dy = max(dy, top * ROUNDING)
        torch.maximum(radius2, yn.max(), out=radius2)
        bias = yn.clone() if metric.norm_bias else None
        blocks.append((r0, _pack(w), s, bias, None if dead is None else dead.clone()))
    return PackedBank(blocks, l1, dy, radius2, src.d)


def quantize_queries(
    xs: torch.Tensor, metric: Metric, ws: Workspace
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor] | None:
    """(q (bqp, d) uint8, sx, |X^|_1 (bq,), |X^| (bq,)) for the prepared queries xs (bq, d),
    padded with zero rows to a multiple of QUERY_ROWS; None when X does not scale (overflow)."""
    bq, d = xs.shape
    big = xs.abs().amax()
    sx = float(big) * -metric.query_scale / X_LEVELS
    if not math.isfinite(sx) or sx > 3e38:
        return None
    sx = float(torch.tensor(sx if sx > 0 else 1.0, dtype=torch.float32))  # what oneDNN uses
    if sx < TINY:  # 1 / sx would overflow float32: scan these in fp32
        return None
    bqp = -(-bq // QUERY_ROWS) * QUERY_ROWS
    qf = ws.get("int8 xq", (bq, d))
    torch.mul(xs, metric.query_scale / sx, out=qf)
    qf.round_().clamp_(-X_LEVELS, X_LEVELS)
    q = ws.get("int8 q", (bqp, d), torch.uint8)
    q[:bq].copy_(qf.add_(ZERO_POINT))
    q[bq:].fill_(ZERO_POINT)
    qf.sub_(ZERO_POINT)
    l1 = qf.abs().sum(1, dtype=torch.float64) * sx
    norm = torch.linalg.vector_norm(qf, dim=1).double() * sx
    return q, sx, l1, norm


def tiles(
    q: torch.Tensor, sx: float, bank: PackedBank, bq: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(r0, score tile (bq, nbk) float32) over the packed bank, dead rows at +inf. Each tile
    is a fresh tensor (and oneDNN takes an int32 scratch of the same size): oneDNN has no
    out= here, and its in-place sum post-op measured 15% slower than letting malloc reuse the
    freed tile, which the service's allocator settings allow (`service._observe`)."""
    for r0, qw, s, bias, dead in bank.blocks:
        tile = _scores(q, sx, qw, s, bias)[:bq]
        if dead is not None:
            tile.masked_fill_(dead.unsqueeze(0), math.inf)
        yield r0, tile


def error_bound(
    sx: float, l1: torch.Tensor, norm: torch.Tensor, bank: PackedBank, base: torch.Tensor
) -> torch.Tensor:
    """E_q (bq,) float64 for the int8 scan: the module docstring's bound on top of `base`,
    the fp32 bound of the same queries (`_precision.error_bound`)."""
    r = math.sqrt(float(bank.radius2)) * (1 + 1e-5)
    r_hat = r + math.sqrt(bank.d) * bank.dy  # the largest |y^_j|
    quantization = sx * ROUNDING * bank.l1 + l1 * bank.dy
    return base + quantization + 8 * U32 * (norm * r_hat + r * r) + 8 * TINY
