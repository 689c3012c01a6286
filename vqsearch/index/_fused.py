"""k = 1 on a GPU in one Triton kernel: the bf16 GEMM and the running (best, row, second best)
fused, so the score tile never goes to memory.

The torch scan (`_scan`) writes each bf16 score tile and reads it back for its minima: on an H200
that pass costs as much as the GEMM, and the 2.2 TFLOP tokenization case sat at 18 ms. Here
each program keeps a block of queries resident, streams the bank through in blocks of rows, and
folds every block of scores into its running best, second best and row in registers.

Scores are ``s = (-2 x) . y + |y|^2`` for l2 (both sides centred) and ``(-x) . y`` for ip and
cosine, with x and y rounded to bf16, products accumulated in fp32 (tensor cores), and the
float32 bias (squared norm; +inf for dead rows and padding) added once in fp32: the bound of
`_precision.BF16_FUSED`, half that of a bf16 tile (no bf16 rounding of the scores).

Triton ships with CUDA builds of torch; without it, or for d > MAX_D (256), the torch scan runs.
The kernel is built on first use (importing triton costs a second), and the CPU tests run it
under Triton's interpreter (TRITON_INTERPRET=1, float32 operands) where triton is installed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ._validate import Metric

# A block of queries stays resident, (BLOCK_M, D) bf16 per program: at D = 256 that and two
# stages of rows take 192 of an H100/H200's 228 KiB of shared memory; wider D would not fit
# this configuration (and was never run), so wider banks take the torch scan.
MAX_D = 256
# BLOCK_M queries resident, BLOCK_N bank rows per step; shared memory holds the queries and
# num_stages row blocks (228 KiB on an H100/H200).
# Measured on an H200 (bench/results/gpu.md: 262,144 queries x 16384 x 256, whole search):
# (BLOCK_M, BLOCK_N, warps, stages) = (128, 64, 4, 3) 12.1 ms, (128, 64, 8, 3) 10.8,
# (128, 128, 8, 2) 10.4, (64, 128, 4, 3) 12.1, (256, 64, 8, 2) 9.9, (128, 32, 4, 4) 16.0.
CONFIG: dict[str, int] = {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, or None without triton (imported on first use: it takes a second)."""
    try:
        from ._fused_kernel import nearest_kernel
    except ImportError:
        return None
    return nearest_kernel


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

    y: torch.Tensor  # (nb, D) in the operand dtype, zero-padded
    bias: torch.Tensor  # (nb,) float32
    radius2: torch.Tensor  # 0-d float32: the largest squared norm of a prepared row


def bank_operand(
    blocks: Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]],
    nb: int,
    d: int,
    metric: Metric,
    dtype: torch.dtype,
    device: torch.device,
) -> BankOperand:
    """From the prepared blocks of `_rows.prepared_blocks` (rows, float32 squared norms, dead)."""
    y = torch.zeros(nb, _width(d), dtype=dtype, device=device)
    bias = torch.zeros(nb, device=device)
    radius2 = torch.zeros((), device=device)
    for r0, yp, yn, dead in blocks:
        r1 = r0 + yp.shape[0]
        y[r0:r1, :d] = yp
        if metric == "l2":
            bias[r0:r1] = yn
        if dead is not None:
            bias[r0:r1].masked_fill_(dead, float("inf"))
        torch.maximum(radius2, yn.max(), out=radius2)
    return BankOperand(y, bias, radius2)


def nearest(
    xs: torch.Tensor,
    bank: BankOperand,
    metric: Metric,
    best: torch.Tensor,
    second: torch.Tensor,
    arg: torch.Tensor,
    config: dict[str, int] | None = None,
) -> None:
    """Write the best score, second best score (float32) and row (int64) of every prepared
    query xs (nq, d) into best, second, arg (nq,)."""
    nq, d = xs.shape
    x = torch.zeros(nq, bank.y.shape[1], dtype=bank.y.dtype, device=xs.device)
    torch.mul(xs, -2.0 if metric == "l2" else -1.0, out=x[:, :d])
    rows = torch.empty(nq, dtype=torch.int32, device=xs.device)
    cfg = config or CONFIG
    grid = (-(-nq // cfg["BLOCK_M"]),)
    _kernel()[grid](
        x, bank.y, bank.bias, best, second, rows, nq, bank.y.shape[0], D=bank.y.shape[1], **cfg
    )
    arg.copy_(rows)
