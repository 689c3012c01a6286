"""The fused Triton k = 1 kernel: exact through the search, its scores within their bound.

On a GPU it runs as built; without one it runs under Triton's interpreter (float32 operands),
which checks its indexing, masking, ties and folding. Skipped where triton is not installed
(CI: triton comes with CUDA builds of torch only)."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from tests.conftest import brute_force
from tests.test_precision import hard_datasets
from vqsearch.index import Bank, _exact, _fused, _precision, knn
from vqsearch.index._rows import MatrixRows, bank_center, prepare, prepared_blocks

GPU = torch.cuda.is_available()
if not GPU:  # read when triton is imported: its language functions become interpreted ones
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
DEVICE = torch.device("cuda" if GPU else "cpu")
METRICS = ["l2", "ip", "cosine"]


@pytest.fixture(autouse=True)
def fused_everywhere(monkeypatch):
    """The GPU path on whatever device there is: the interpreter stands in for a GPU."""
    if not GPU:
        from triton.runtime import interpreter

        # Triton 3.6's interpreter turns scalar arguments into 1-element arrays and int()s
        # them for range(), which NumPy 2.4 refuses: index them instead.
        real = interpreter._patch_lang_tensor

        def patch(tensor, scope):
            real(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda t: int(t.handle.data.reshape(-1)[0]))

        monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch)
        monkeypatch.setattr(_fused, "available", lambda device, nb, d: True)
        monkeypatch.setattr(_exact, "gpu_style", lambda device: True)
    flags = torch.backends.cuda.matmul
    saved = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    _fused._kernel.cache_clear()
    yield
    _fused._kernel.cache_clear()
    flags.allow_bf16_reduced_precision_reduction = saved


@pytest.mark.parametrize("metric", METRICS)
def test_fused_search_equals_brute_force(rng, metric, monkeypatch):
    """k = 1 through the fused kernel: float64 brute force on every hard data set."""
    calls: list[int] = []
    real = _fused.nearest
    monkeypatch.setattr(_fused, "nearest", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for kind, (xq, xb) in hard_datasets(rng).items():
        stats: Counter[str] = Counter()
        I = knn(xq, xb, 1, metric, device=DEVICE, precision="bf16", stats=stats)[1]
        np.testing.assert_array_equal(I, brute_force(xq, xb, 1, metric)[1], err_msg=kind)
        assert stats["bf16 k=1 scanned"] == len(xq), kind
    assert calls


def test_fused_ties_and_dead_rows(rng, tmp_path):
    """Exact duplicates go to the lowest id, and removed rows are never answered."""
    code = rng.standard_normal((40, 16)).astype(np.float32)
    xb = np.concatenate([code, code, code])  # each vector at rows r, r + 40, r + 80
    xq = code[rng.integers(0, 40, 300)] + 0.01 * rng.standard_normal((300, 16)).astype(np.float32)
    I = knn(xq, xb, 1, device=DEVICE, precision="bf16")[1][:, 0]
    np.testing.assert_array_equal(I, brute_force(xq, xb, 1, "l2")[1][:, 0])
    assert (I < 40).all()
    bank = Bank.create(tmp_path / "b", d=16)
    bank.add(xb)
    bank.remove(np.arange(40))  # the first copies: the answers move to r + 40
    np.testing.assert_array_equal(bank.nearest(xq, device=DEVICE, precision="bf16")[1], I + 40)


@pytest.mark.parametrize("metric", METRICS)
def test_fused_scores_within_the_bound(rng, metric):
    """The kernel's best and second best scores are within E_q of the float64 ones."""
    xq, xb = hard_datasets(rng)["offset"]
    src = MatrixRows(torch.from_numpy(xb).to(DEVICE))
    center = bank_center(src, metric)
    dtype = torch.bfloat16 if GPU else torch.float32
    blocks = prepared_blocks(src, 1024, metric, center, DEVICE, dtype)
    bank = _fused.bank_operand(blocks, src.n, src.d, metric, dtype, DEVICE)
    xs = prepare(torch.from_numpy(xq).to(DEVICE), metric, center)
    best, second = torch.empty(len(xq), device=DEVICE), torch.empty(len(xq), device=DEVICE)
    arg = torch.empty(len(xq), dtype=torch.int64, device=DEVICE)
    _fused.nearest(xs, bank, metric, best, second, arg)
    yp = prepare(torch.from_numpy(xb).to(DEVICE), metric, center).double()
    xd = xs.double()
    true = (yp * yp).sum(1) - 2 * xd @ yp.T if metric == "l2" else -(xd @ yp.T)
    two = true.topk(2, dim=1, largest=False).values
    e = _precision.error_bound(xs, bank.radius2, metric, _precision.BF16_FUSED)
    assert bool(((best.double() - two[:, 0]).abs() <= e).all())
    assert bool(((second.double() - two[:, 1]).abs() <= e).all())
    assert bool(((true.gather(1, arg.unsqueeze(1))[:, 0] - two[:, 0]) <= 2 * e).all())
