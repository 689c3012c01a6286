"""The Triton kernels of `_fused` (their own module: imported only when a search needs them)."""

import triton
import triton.language as tl

# The exponent range of the per-query scales (`operand_kernel`): products of two scales stay
# normal float32 numbers, and a query beyond it is flagged rather than overflowed.
EXP_LO = tl.constexpr(127 - 50)
EXP_HI = tl.constexpr(127 + 50)


@triton.jit
def operand_kernel(
    x_ptr,  # (nq, d) float32 queries: raw (l2, ip) or unit-norm (cosine)
    c_ptr,  # (d,) float32 centre (l2), read when HAS_CENTER
    out_ptr,  # (nq, D) operand dtype: NEG x sx, zero-padded
    xn2_ptr,  # (nq,) float32: |x - c|^2
    ix_ptr,  # (nq,) float32: 1 / sx, or +inf where x is beyond the scales' range
    nq,
    d,
    NEG: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    rq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rk = tl.arange(0, D)
    live = (rq[:, None] < nq) & (rk[None, :] < d)
    x = tl.load(x_ptr + rq[:, None] * d + rk[None, :], mask=live, other=0.0)
    if HAS_CENTER:
        x = tl.where(live, x - tl.load(c_ptr + rk, mask=rk < d, other=0.0)[None, :], 0.0)
    # sx = 2**(13 - floor(log2 max|x|)) read off the exponent bits, so max|x| sx is in
    # [2**13, 2**14) and |NEG x sx| < 2**15 fits float16; powers of two scale exactly.
    e = (tl.max(tl.abs(x), axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF
    big = e > EXP_HI
    e = tl.minimum(tl.maximum(e, EXP_LO), EXP_HI)
    sx = ((267 - e) << 23).to(tl.float32, bitcast=True)
    ix = tl.where(big, float("inf"), ((e - 13) << 23).to(tl.float32, bitcast=True))
    # a flagged query gets a zero operand: finite scores that its infinite bound leaves unproven
    xh = tl.where(big[:, None], 0.0, x * (sx * NEG)[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rq[:, None] * D + rk[None, :], xh, mask=rq[:, None] < nq)
    tl.store(xn2_ptr + rq, tl.sum(x * x, axis=1), mask=rq < nq)
    tl.store(ix_ptr + rq, ix, mask=rq < nq)


@triton.jit
def nearest_kernel(
    x_ptr,  # (nq, D) scaled query operands (`operand_kernel`)
    ix_ptr,  # (nq,) float32: their inverse scales
    y_ptr,  # (nb, D) bank rows, scaled by 1 / iy
    iy,  # float32: the rows' inverse scale
    bias_ptr,  # (nb,) float32: |y|^2, 0, or +inf for dead rows
    best_ptr,
    second_ptr,
    arg_ptr,  # (nq,) int64
    nq,
    nb,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, D)
    x = tl.load(x_ptr + rm[:, None] * D + rk[None, :], mask=rm[:, None] < nq, other=0.0)
    # back to the scores' own units: a power of two, exact (0 for the flagged: see above)
    ixy = tl.load(ix_ptr + rm, mask=rm < nq, other=1.0) * iy
    ixy = tl.where(ixy < float("inf"), ixy, 0.0)
    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    second = tl.full((BLOCK_M,), float("inf"), tl.float32)
    arg = tl.zeros((BLOCK_M,), tl.int32)
    for n0 in range(0, nb, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        y = tl.load(y_ptr + rn[:, None] * D + rk[None, :], mask=rn[:, None] < nb, other=0.0)
        bias = tl.load(bias_ptr + rn, mask=rn < nb, other=float("inf"))
        s = tl.dot(x, tl.trans(y)) * ixy[:, None] + bias[None, :]
        # the minimum and its first column in one reduction, then the best of the others
        m, j = tl.min(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        m2 = tl.min(tl.where(tl.arange(0, BLOCK_N)[None, :] == j[:, None], float("inf"), s), 1)
        hot = m < best  # ties with an earlier block keep the earlier row
        second = tl.where(hot, tl.minimum(best, m2), tl.minimum(second, m))
        arg = tl.where(hot, n0 + j, arg)
        best = tl.where(hot, m, best)
    keep = rm < nq
    tl.store(best_ptr + rm, best, mask=keep)
    tl.store(second_ptr + rm, second, mask=keep)
    tl.store(arg_ptr + rm, arg.to(tl.int64), mask=keep)


@triton.jit
def exact_kernel(
    x_ptr,  # (nq, d) float32 queries as given
    y_ptr,  # (nb, d) float32 bank rows as given
    rows_ptr,  # (nq,) int64: the row to score for each query
    out_ptr,  # (nq,) float64 distance, smaller is nearer
    nq,
    d,
    METRIC: tl.constexpr,  # 0 l2, 1 ip, 2 cosine
    D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    rq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rk = tl.arange(0, D)
    live = (rq[:, None] < nq) & (rk[None, :] < d)
    rows = tl.load(rows_ptr + rq, mask=rq < nq, other=0)
    x = tl.load(x_ptr + rq[:, None] * d + rk[None, :], mask=live, other=0.0).to(tl.float64)
    y = tl.load(y_ptr + rows[:, None] * d + rk[None, :], mask=live, other=0.0).to(tl.float64)
    if METRIC == 0:
        dist = tl.sum((x - y) * (x - y), axis=1)
    elif METRIC == 1:
        dist = -tl.sum(x * y, axis=1)
    else:
        norms = tl.sqrt(tl.sum(x * x, axis=1)) * tl.sqrt(tl.sum(y * y, axis=1))
        dist = -tl.sum(x * y, axis=1) / tl.where(rq < nq, norms, 1.0)
    tl.store(out_ptr + rq, dist, mask=rq < nq)
