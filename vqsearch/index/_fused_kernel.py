"""The Triton kernel of `_fused` (its own module: imported only when a search needs it)."""

import triton
import triton.language as tl


@triton.jit
def nearest_kernel(
    x_ptr,  # (nq, D) queries, already -2x or -x
    y_ptr,  # (nb, D) bank rows
    bias_ptr,  # (nb,) float32: |y|^2, 0, or +inf for dead rows
    best_ptr,
    second_ptr,
    arg_ptr,
    nq,
    nb,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, D)
    x = tl.load(x_ptr + rm[:, None] * D + rk[None, :], mask=rm[:, None] < nq, other=0.0)
    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    second = tl.full((BLOCK_M,), float("inf"), tl.float32)
    arg = tl.zeros((BLOCK_M,), tl.int32)
    for n0 in range(0, nb, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        y = tl.load(y_ptr + rn[:, None] * D + rk[None, :], mask=rn[:, None] < nb, other=0.0)
        bias = tl.load(bias_ptr + rn, mask=rn < nb, other=float("inf"))
        s = tl.dot(x, tl.trans(y)) + bias[None, :]
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
    tl.store(arg_ptr + rm, arg, mask=keep)
