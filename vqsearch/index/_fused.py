"""k = 1 on a GPU in Triton kernels: the GEMM and the running (best, row, second best) fused,
so the score tile never goes to memory.

The torch scan (`_scan`) writes each bf16 score tile and reads it back for its minima: on an H200
that pass costs as much as the GEMM, and the 2.2 TFLOP tokenization case sat at 18 ms. Here
each program keeps a block of queries resident, streams the bank through in blocks of rows, and
folds every block of scores into its running best, second best and row in registers.

Scores are ``s = (-2 x) . y + |y|^2`` for l2 (both sides centred) and ``(-x) . y`` for ip and
cosine, with x and y rounded to fp16 (or bf16), products accumulated in fp32 (tensor cores), and
the float32 bias (squared norm; +inf for dead rows and padding) added once in fp32: the bound of
`_precision.FP16` (`BF16_FUSED`), no rounding of the scores. fp16 needs its operands in range:
each query and the bank are scaled by a power of two (exact) so that their largest component
lands in [2**13, 2**14); what still underflows is bounded in `error_bound`.

A search is three kernels: `operand_kernel` centres and scales the queries, `nearest_kernel`
scans (the bound is then a few float64 torch ops), and after the one sync `exact_kernel` scores
each chosen row in float64 (for a matrix on the GPU; a bank re-ranks where its rows live).

Triton ships with CUDA builds of torch; without it, or for d > MAX_D (256), the torch scan runs.
The kernels are built on first use (importing triton costs a second), and the CPU tests run
them under Triton's interpreter (TRITON_INTERPRET=1; bf16 as float32 operands, fp16 as fp16)
where triton is installed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from ._metric import Metric
from ._precision import U32, Precision, norm_bound
from ._rows import RowSource, prepared_blocks
from ._workspace import Workspace

# A block of queries stays resident, (BLOCK_M, D) 16-bit per program: at D = 256 that and the
# stages of rows take 96 to 160 of an H100/H200's 228 KiB of shared memory; wider D would not
# fit every configuration (and was never run), so wider banks take the torch scan.
MAX_D = 256
# BLOCK_M queries resident, BLOCK_N bank rows per step; shared memory holds the queries and
# num_stages row blocks (228 KiB on an H100/H200). This one was the fastest of four
# configurations for a whole 262,144 x 16384 x 256 search on an H200 (bench/gpu.py).
CONFIG: dict[str, int] = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


OPERAND_QUERIES = 32  # queries per program of the operand and exact kernels
EXACT_QUERIES = 16


@functools.cache
def _kernel() -> Any:
    """The jitted kernels' module, or None without triton (imported on first use: it takes a
    second)."""
    try:
        from . import _fused_kernel
    except ImportError:
        return None
    return _fused_kernel


MAX_BANK_BYTES = 1 << 30  # the bank operand is a padded copy of the bank


def available(device: torch.device, nb: int, d: int) -> bool:
    """Whether the fused kernel can run this search."""
    fits = d <= MAX_D and nb * _width(d) * 2 <= MAX_BANK_BYTES
    return device.type == "cuda" and fits and _kernel() is not None


def _width(d: int) -> int:
    """Operand width: a power of two (Triton block shapes) of at least 16 (tl.dot's least K)."""
    return max(16, 1 << (d - 1).bit_length())


@dataclass
class BankOperand:
    """The bank as the kernel reads it, built once per search."""

    y: torch.Tensor  # (nb, D) in the operand dtype, zero-padded, scaled by 1 / iy
    iy: float  # the rows' inverse scale (a power of two; +inf: out of range)
    bias: torch.Tensor  # (nb,) float32
    radius2: torch.Tensor  # 0-d float32: the largest squared norm of a prepared row
    prec: Precision  # the bound's: bf16 or fp16 inputs, fp32 scores


def _scales(m: float) -> tuple[float, float]:
    """(s, 1 / s) for rows of largest component at most m: s = 2**(13 - floor(log2 m)), so
    m s < 2**14, with floor(log2 m) clamped to [-50, 50] as `_fused_kernel` clamps the
    queries'; (0, +inf) above that range (a zero operand, and an infinite bound)."""
    e = max(math.frexp(m)[1] - 1, -50)  # m = f 2**e, f in [0.5, 1); m = 0 gives e = 0
    return (2.0 ** (13 - e), 2.0 ** (e - 13)) if e <= 50 else (0.0, math.inf)


def bank_operand(
    src: RowSource,
    bs: int,
    metric: Metric,
    center: torch.Tensor | None,
    prec: Precision,
    device: torch.device,
    ws: Workspace,
) -> BankOperand:
    """The prepared bank (`_rows.prepared_blocks`) rounded to the operand dtype, fp16 scaled
    first into its range by a power of two, from the bank's radius (a first pass over the
    blocks' norms, and one sync: the GPU is idle here anyway). Triton's interpreter (the CPU
    tests) misreads bf16: it gets float32 operands, which the bf16 bound covers too."""
    dtype = torch.float32 if device.type == "cpu" and prec.dtype == torch.bfloat16 else prec.dtype
    nb, d = src.n, src.d
    radius2 = torch.zeros((), device=device)
    scale, iy = 1.0, 1.0
    fp16 = prec.dtype == torch.float16
    if fp16:
        for _, _, yn, _ in prepared_blocks(src, bs, metric, center, device, ws=ws):
            torch.maximum(radius2, yn.max(), out=radius2)
        # every component is at most the radius (rounded up for the float32 sums)
        scale, iy = _scales(math.sqrt(float(radius2)) * (1 + d * U32))
    y = torch.zeros(nb, _width(d), dtype=dtype, device=device)
    bias = torch.zeros(nb, device=device)
    for r0, yp, yn, dead in prepared_blocks(src, bs, metric, center, device, ws=ws):
        r1 = r0 + yp.shape[0]
        torch.mul(yp, scale, out=y[r0:r1, :d])
        if metric.norm_bias:
            bias[r0:r1] = yn
        if dead is not None:
            bias[r0:r1].masked_fill_(dead, float("inf"))
        if not fp16:  # else the first pass has it
            torch.maximum(radius2, yn.max(), out=radius2)
    return BankOperand(y, iy, bias, radius2, prec)


def query_operand(
    x: torch.Tensor, center: torch.Tensor | None, bank: BankOperand, metric: Metric
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(operand (nq, D), |x - c|^2 (nq,), inverse scales (nq,)) of queries x (nq, d) float32:
    as given for l2 (centred here) and ip, unit-norm for cosine (`operand_kernel`)."""
    nq, d = x.shape
    xh = torch.empty(nq, bank.y.shape[1], dtype=bank.y.dtype, device=x.device)
    xn2, ix = torch.empty(nq, device=x.device), torch.empty(nq, device=x.device)
    _kernel().operand_kernel[(-(-nq // OPERAND_QUERIES),)](
        x,
        x if center is None else center.to(x.device),
        xh,
        xn2,
        ix,
        nq,
        d,
        NEG=metric.query_scale,
        HAS_CENTER=center is not None,
        D=bank.y.shape[1],
        BLOCK_Q=OPERAND_QUERIES,
    )
    return xh, xn2, ix


def scan(
    xh: torch.Tensor,
    ix: torch.Tensor,
    bank: BankOperand,
    best: torch.Tensor,
    second: torch.Tensor,
    arg: torch.Tensor,
    config: dict[str, int] | None = None,
) -> None:
    """`nearest_kernel` over query operands: best, second best (float32), row (int64)."""
    nq, cfg = xh.shape[0], config or CONFIG
    _kernel().nearest_kernel[(-(-nq // cfg["BLOCK_M"]),)](
        xh, ix, bank.y, bank.iy, bank.bias, best, second, arg, nq, bank.y.shape[0],
        D=bank.y.shape[1], **cfg,
    )  # fmt: skip


def nearest(
    x: torch.Tensor,
    center: torch.Tensor | None,
    bank: BankOperand,
    metric: Metric,
    best: torch.Tensor,
    second: torch.Tensor,
    arg: torch.Tensor,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Write the best score, second best score (float32) and row (int64) of every query x
    (nq, d) float32 into best, second, arg (nq,); return their error bounds E_q (nq,) float64.
    x is as given for l2 (the kernel centres it) and ip, unit-norm for cosine."""
    xh, xn2, ix = query_operand(x, center, bank, metric)
    scan(xh, ix, bank, best, second, arg, config)
    return error_bound(xn2, ix, bank, metric)


def error_bound(
    xn2: torch.Tensor, ix: torch.Tensor, bank: BankOperand, metric: Metric
) -> torch.Tensor:
    """E_q (nq,) float64 of the kernel's scores: `_precision.norm_bound` for its precision,
    plus what rounding a scaled operand to a subnormal (or zero) may lose, which no relative
    bound covers: at most 2**-25 / s per component, s its scale (ix = 1 / s for the queries,
    iy for the rows), so at most 2**-25 sqrt(d) (R ix + |NEG x| iy) + d 2**-50 ix iy per
    score. Taken twice, as `_precision` takes its terms."""
    d = bank.y.shape[1]
    xn = xn2.double().sqrt() * (1 + (d + 4) * U32)
    e = norm_bound(xn, bank.radius2, d, metric, bank.prec)
    radius = bank.radius2.double().sqrt() * (1 + 1e-5)
    # bf16 keeps float32's exponent range: its rows' underflow is `_precision`'s flushed term
    ix64, iy = ix.double(), bank.iy if bank.prec.dtype == torch.float16 else 0.0
    neg = -metric.query_scale
    tiny = 2.0**-24 * math.sqrt(d) * (radius * ix64 + neg * xn * iy) + d * 2.0**-49 * ix64 * iy
    return torch.where(torch.isfinite(tiny), e + tiny, math.inf)


def exact(xq: torch.Tensor, xb: torch.Tensor, rows: torch.Tensor, metric: Metric) -> torch.Tensor:
    """float64 distance (smaller is nearer) of each query xq (nq, d) to its row of xb (nb, d),
    rows (nq,) int64, by the direct formula as `Metric.exact64` has it, in one pass on the GPU
    (torch's float64 expansion of a 262,144-query batch writes some 4 GB)."""
    nq, d = xq.shape
    out = torch.empty(nq, dtype=torch.float64, device=xq.device)
    _kernel().exact_kernel[(-(-nq // EXACT_QUERIES),)](
        xq.contiguous(), xb.contiguous(), rows, out, nq, d,
        METRIC=metric.kernel_id, D=_width(d), BLOCK_Q=EXACT_QUERIES,
    )  # fmt: skip
    return out
