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
from vqsearch.index._metric import IP, L2, metric_of
from vqsearch.index._rows import MatrixRows, bank_center, prepare
from vqsearch.index._scans import fused_bound as _fused_bound
from vqsearch.index._workspace import Workspace

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


# bf16 runs with float32 operands under the interpreter; fp16 rounds there as on a GPU.
LOW = [_precision.BF16, _precision.FP16]


@pytest.mark.parametrize("prec", LOW, ids=lambda p: p.name)
@pytest.mark.parametrize("metric", METRICS)
def test_fused_search_equals_brute_force(rng, metric, prec, monkeypatch):
    """k = 1 through the fused kernel: float64 brute force on every hard data set."""
    calls: list[int] = []
    real = _fused.nearest
    monkeypatch.setattr(_fused, "nearest", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for kind, (xq, xb) in hard_datasets(rng).items():
        stats: Counter[str] = Counter()
        I = knn(xq, xb, 1, metric, device=DEVICE, precision=prec, stats=stats)[1]
        np.testing.assert_array_equal(I, brute_force(xq, xb, 1, metric)[1], err_msg=kind)
        assert stats[f"{prec.name} k=1 scanned"] == len(xq), kind
    assert calls


def test_fused_ties_and_dead_rows(rng, tmp_path):
    """Exact duplicates go to the lowest id, and removed rows are never answered."""
    code = rng.standard_normal((40, 16)).astype(np.float32)
    xb = np.concatenate([code, code, code])  # each vector at rows r, r + 40, r + 80
    xq = code[rng.integers(0, 40, 300)] + 0.01 * rng.standard_normal((300, 16)).astype(np.float32)
    I = knn(xq, xb, 1, device=DEVICE, precision=_precision.FP16)[1][:, 0]
    np.testing.assert_array_equal(I, brute_force(xq, xb, 1, "l2")[1][:, 0])
    assert (I < 40).all()
    bank = Bank.create(tmp_path / "b", d=16)
    bank.add(xb)
    bank.remove(np.arange(40))  # the first copies: the answers move to r + 40
    np.testing.assert_array_equal(
        bank.nearest(xq, device=DEVICE, precision=_precision.FP16)[1], I + 40
    )


def kernel_scores(xq, xb, metric, prec, scale=1.0):
    """(best, second, arg, E) of the fused kernel, and the float64 scores of every row."""
    metric = metric_of(metric)
    src = MatrixRows(torch.from_numpy(xb).to(DEVICE))
    center = bank_center(src, metric)
    bank = _fused.bank_operand(src, 1024, metric, center, prec, DEVICE, Workspace())
    x = torch.from_numpy(xq).to(DEVICE)
    best, second = torch.empty(len(xq), device=DEVICE), torch.empty(len(xq), device=DEVICE)
    arg = torch.empty(len(xq), dtype=torch.int64, device=DEVICE)
    xk = prepare(x, metric, None) if metric.unit else x
    e = _fused.nearest(xk, center, bank, metric, best, second, arg)
    yp = prepare(torch.from_numpy(xb).to(DEVICE), metric, center).double()
    xd = prepare(x, metric, center).double()
    true = (yp * yp).sum(1) - 2 * xd @ yp.T if metric is L2 else -(xd @ yp.T)
    return best.double(), second.double(), arg, e * scale, true


@pytest.mark.parametrize("prec", LOW, ids=lambda p: p.name)
@pytest.mark.parametrize("metric", METRICS)
def test_fused_scores_within_the_bound(rng, metric, prec):
    """The kernel's best and second best scores are within E_q of the float64 ones, also for
    components spread over 30 decades (fp16's scaled operands underflow there)."""
    for kind in ("offset", "wide", "clustered"):
        xq, xb = hard_datasets(rng)[kind]
        best, second, arg, e, true = kernel_scores(xq, xb, metric, _fused_bound(prec))
        two = true.topk(2, dim=1, largest=False).values
        assert bool(((best - two[:, 0]).abs() <= e).all()), kind
        assert bool(((second - two[:, 1]).abs() <= e).all()), kind
        assert bool(((true.gather(1, arg.unsqueeze(1))[:, 0] - two[:, 0]) <= 2 * e).all()), kind


def test_fp16_bound_is_not_vacuous(rng):
    """fp16 scores err by more than 1% of their bound somewhere, and cutting the
    subnormal term breaks the bound on data spread over 30 decades: both terms are needed."""
    xq, xb = hard_datasets(rng)["offset"]
    best, _, _, e, true = kernel_scores(xq, xb, "l2", _precision.FP16)
    assert bool(((best - true.min(1).values).abs() > 0.01 * e).any())
    wide = rng.standard_normal((300, 24)) * 10.0 ** rng.uniform(-30, 8, (300, 1))
    xq, xb = wide[:100].astype(np.float32), wide[100:].astype(np.float32)
    best, _, _, e, true = kernel_scores(xq, xb, "ip", _precision.FP16)
    src = MatrixRows(torch.from_numpy(xb).to(DEVICE))
    bank = _fused.bank_operand(src, 1024, IP, None, _precision.FP16, DEVICE, Workspace())
    xn = torch.linalg.vector_norm(torch.from_numpy(xq).to(DEVICE), dim=1).double()
    relative = _precision.norm_bound(xn * (1 + 1e-5), bank.radius2, 32, IP, _precision.FP16)
    err = (best - true.min(1).values).abs()
    assert bool((err <= e).all())
    assert bool((err > relative).any())


def test_fp16_out_of_range_goes_to_fp32(rng):
    """Components beyond the scales' range (2**51) make the bound infinite: exact in fp32."""
    xb = rng.standard_normal((200, 8)).astype(np.float32)
    xq = xb[:20] * np.float32(2.0**55)
    stats: Counter[str] = Counter()
    I = knn(xq, xb, 1, "ip", device=DEVICE, precision=_precision.FP16, stats=stats)[1]
    np.testing.assert_array_equal(I, brute_force(xq, xb, 1, "ip")[1])
    assert stats["fp16 k=1 proven"] == 0 and stats["fp16 k=1 scanned"] == 20
    I = knn(xb[:20], xb * np.float32(2.0**55), 1, device=DEVICE, precision=_precision.FP16)[1]
    np.testing.assert_array_equal(I, brute_force(xb[:20], xb * np.float32(2.0**55), 1, "l2")[1])


@pytest.mark.parametrize("metric", METRICS)
def test_exact_kernel_is_the_float64_formula(rng, metric):
    """The one-pass kernel scores each query's row as `Metric.exact64` does, to float64 rounding."""
    xb = (rng.standard_normal((500, 40)) * 3 + 1).astype(np.float32)
    xq = (rng.standard_normal((333, 40)) * 3).astype(np.float32)
    rows = torch.from_numpy(rng.integers(0, 500, 333)).to(DEVICE)
    x, y = torch.from_numpy(xq).to(DEVICE), torch.from_numpy(xb).to(DEVICE)
    got = _fused.exact(x, y, rows, metric_of(metric))
    want = metric_of(metric).exact64(x, y[rows].unsqueeze(1))[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
