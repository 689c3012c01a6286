"""Which arithmetic the candidate scan runs in, and how far its scores may be from the truth.

The scan only proposes candidates; the float64 re-rank decides. So a cheaper arithmetic keeps
the answer exact as long as the bound on each score's error is honest, and a query whose
candidates the bound cannot prove is searched again in fp32, then in float64 (`_exact`).

bf16 candidates: inputs rounded to 8 significand bits, products accumulated in fp32, scores
rounded to bf16. On a CPU with avx512_bf16 or AMX (oneDNN) that GEMM runs at about twice the
fp32 rate; on a GPU it runs on the tensor cores. The price is a bound about 500x looser, so
queries whose nearest rows are close together fall back to fp32 more often.

The bound, for a score s = |y|^2 - 2 x.y (l2, both sides centred), -x.y (ip) or -cos (cosine),
with R the largest |y| over the bank and P = |x| R >= sum |x_i y_i| (Cauchy-Schwarz):
input rounding costs (2 u_in) P per dot product, fp32 accumulation d u32 P (the textbook
gamma_d), output rounding u_out per rounded value. Summed for l2 that is at most
(2 u_in + 2 u_out + d u32) (|x| + R)^2; we use twice that, with d + 8 for the centring and the
norm. bf16 kernels may also flush subnormals to zero: an absolute term covers it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ._metric import Metric

U32 = 2.0**-24
BF16_U = 2.0**-8  # round to nearest even, 8 significand bits (what Tensor.bfloat16() does)
TF32_U = 2.0**-10  # 10 stored bits; truncation is allowed for, not only rounding
TINY = 2.0**-126  # the smallest normal float32 (and bf16): flushed subnormals are below it

Requested = Literal["auto", "fp32", "bf16", "fp16", "int8"]
REQUESTED = ("auto", "fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class Precision:
    """The scan's GEMM: its dtype and the unit roundoff of its inputs and outputs (0: exact
    float32, covered by the accumulation term)."""

    name: str
    dtype: torch.dtype
    u_in: float
    u_out: float


BF16 = Precision("bf16", torch.bfloat16, BF16_U, BF16_U)
# bf16 inputs, scores kept in fp32 and the float32 norm added once (`_fused`): no bf16 output
BF16_FUSED = Precision("bf16", torch.bfloat16, BF16_U, U32)
# fp16 inputs in the fused kernel only (`_fused`: operands scaled by powers of two into its range,
# whose underflow that module bounds), scores in fp32: 3 more significand bits than bf16, so an
# 8x tighter bound at the same tensor-core rate.
FP16 = Precision("fp16", torch.float16, 2.0**-11, U32)
# int8 candidates on CPUs without native bf16 (`_int8`, which also holds its bound); u_in only
# marks it coarser than fp32, so that its unproven queries are scanned again in fp32.
INT8 = Precision("int8", torch.int8, 2.0**-7, U32)
LOW = (BF16, FP16, INT8)  # the candidate precisions 'auto' remembers per bank (`resolve`)


def _fp32_gemm(device: torch.device) -> Precision:
    """fp32 GEMMs as the global torch settings make them: users of `torch.set_float32_matmul_
    precision("high")` get TF32 on a GPU and may get bf16 inputs on a CPU; the bound follows."""
    backend = torch.backends.cuda if device.type == "cuda" else torch.backends.mkldnn
    modes = {
        getattr(getattr(backend, "matmul", None), "fp32_precision", "none"),
        getattr(backend, "fp32_precision", "none"),
        getattr(torch.backends, "fp32_precision", "none"),
        torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        modes.add("tf32")
    if modes & {"bf16", "medium"}:
        return Precision("fp32 (bf16 inputs)", torch.float32, BF16_U, 0.0)
    if modes & {"tf32", "high"}:
        return Precision("tf32", torch.float32, TF32_U, 0.0)
    return Precision("fp32", torch.float32, 0.0, 0.0)


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: without them oneDNN emulates bf16, no faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def choose(
    device: torch.device, requested: str = "auto", k: int = 1, fused: bool = False
) -> Precision:
    """The candidate precision: 'fp32', 'bf16', 'fp16' (the fused GPU kernel, k = 1), 'int8'
    (CPU, k = 1), or 'auto': for k = 1 fp16 where the fused kernel runs this search (`fused`),
    else bf16 where the hardware runs it natively and its bound holds, int8 on other CPUs
    (`_int8`, which falls back to fp32 where oneDNN's kernel fails its check or the batch is
    small), fp32 otherwise. A precision that cannot run here is fp32.

    Why only k = 1: bf16 proves a query when its runner-up scores more than ~6% of
    (|x| + R)^2 above its best, which a code nearest to a latent often does. Its k-th and
    (k + 2)-th neighbours in a dense bank almost never are that far apart (measured: 1000 of
    1000 queries unproven in 1,000,000 x 128, k = 10), and then the bf16 scan is pure cost."""
    if requested not in REQUESTED:
        raise ValueError(f"precision must be one of {', '.join(REQUESTED)}; got {requested!r}")
    # Triton's sums in fp32, not cuBLAS': no reduced-precision flag reaches the fused kernel.
    if device.type == "cuda" and k == 1 and fused and requested in ("auto", "fp16"):
        return FP16
    int8 = requested == "int8" or (requested == "auto" and not _cpu_has_native_bf16())
    if int8 and device.type == "cpu" and k == 1:
        return INT8
    # CUDA's reduced-precision split-K sums are bf16 partial sums, which the bound above does
    # not cover: bf16 there needs torch.backends.cuda.matmul.allow_bf16_reduced_precision_
    # reduction = False (the service sets it), else the scan runs in fp32.
    bound_holds = device.type != "cuda" or (
        not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    )
    if requested == "bf16" and bound_holds:
        return BF16
    if requested != "auto" or k != 1 or not bound_holds:
        return _fp32_gemm(device)
    fast = device.type == "cuda" or (device.type == "cpu" and _cpu_has_native_bf16())
    return BF16 if fast else _fp32_gemm(device)


def error_bound(
    xs: torch.Tensor, radius2: torch.Tensor, metric: Metric, prec: Precision
) -> torch.Tensor:
    """E_q (nq,) float64: bound on |scan score - true score| for every row of the bank, given
    xs the prepared queries and radius2 the largest float32 squared norm of a prepared row."""
    d = xs.shape[1]
    # float32 norms (a float64 copy of the block would be 4 MiB per search), rounded up by
    # their own error bound; an overflow gives inf, and the float64 scan. All on xs's device:
    # no sync with the host.
    xn = torch.linalg.vector_norm(xs, dim=1).double() * (1 + (d + 4) * U32)
    return norm_bound(xn, radius2, d, metric, prec)


def norm_bound(
    xn: torch.Tensor, radius2: torch.Tensor, d: int, metric: Metric, prec: Precision
) -> torch.Tensor:
    """`error_bound` from xn (nq,) float64, the prepared queries' norms rounded up."""
    c = 2.0 * ((d + 8) * U32 + 2 * prec.u_in + 2 * prec.u_out)
    radius = radius2.double().sqrt() * (1 + 1e-5)  # the float32 norm's own rounding
    flushed = 4 * d * TINY * (1 + xn + radius)
    e = metric.bound(c, xn, radius, flushed)
    # A non-finite bound (float32 overflow) sends the query to the float64 scan.
    return torch.where(torch.isfinite(e), e, torch.full_like(e, math.inf))


PROBE_EVERY = 16  # while bf16 fails on a bank, 'auto' still tries it on every 16th call
WORTH_IT = 0.5  # below this proven fraction a bf16 scan costs more than it saves


def resolve(
    precision: str | Precision,
    device: torch.device,
    k: int,
    hints: dict[str, list[float]] | None,
    fused: bool = False,
) -> Precision:
    """The precision of a search's first scan. 'auto' also remembers, per bank (hints), whether
    bf16 proved most queries on the last try: where it did not, the next calls go to fp32 (a
    k-means codebook: ~0.3% proven) and every PROBE_EVERY-th call looks again. fp16 and int8
    are remembered the same way."""
    if isinstance(precision, Precision):
        # fp16 exists only in the fused kernel, whose operands are scaled into its range
        return _fp32_gemm(device) if precision is FP16 and not fused else precision
    prec = choose(device, precision, k, fused)
    if precision != "auto" or prec not in LOW or hints is None:
        return prec
    h = hints.setdefault(f"{prec.name} k={k}", [1.0, 0.0])  # [last proven fraction, calls]
    h[1] += 1
    return prec if h[0] >= WORTH_IT or h[1] % PROBE_EVERY == 0 else _fp32_gemm(device)


def record(hints: dict[str, list[float]] | None, prec: Precision, k: int, proven: float) -> None:
    """Note the proven fraction of a bf16, fp16 or int8 scan for `resolve`."""
    if hints is not None and prec in LOW:
        hints.setdefault(f"{prec.name} k={k}", [1.0, 0.0])[0] = proven
