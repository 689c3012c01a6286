"""bf16 and fp32 candidate scans: exact either way, with an error bound that really bounds."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tests.conftest import brute_force, datasets
from vqsearch.index import Bank, _exact, _precision, _prepared, _scan, _workspace, knn
from vqsearch.index._metric import L2, metric_of
from vqsearch.index._rows import MatrixRows, bank_center, prepare
from vqsearch.index._workspace import Workspace

METRICS = ["l2", "ip", "cosine"]
CPU = torch.device("cpu")


def hard_datasets(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The shared data sets plus: clustered codes with queries between them (a k-means-like
    codebook, where bf16 cannot prove most queries), and components spread over 30 decades."""
    sets = datasets(rng)
    centers = rng.standard_normal((20, 24))
    codes = (centers[rng.integers(0, 20, 1500)] + 0.3 * rng.standard_normal((1500, 24))).astype(
        np.float32
    )
    q = codes[rng.integers(0, 1500, 120)] + 0.2 * rng.standard_normal((120, 24))
    sets["clustered"] = (q.astype(np.float32), codes)
    wide = rng.standard_normal((800, 24)) * 10.0 ** rng.uniform(-15, 15, (800, 1))
    sets["wide"] = (wide[:100].astype(np.float32), wide[100:].astype(np.float32))
    return sets


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 5])
def test_each_precision_equals_float64_brute_force(rng, precision, metric, k, scan_style):
    """Whatever the candidate precision, the ids are float64 brute force on every data set."""
    for kind, (xq, xb) in hard_datasets(rng).items():
        I = knn(xq, xb, k, metric, tile_elems=1 << 15, precision=precision)[1]
        np.testing.assert_array_equal(I, brute_force(xq, xb, k, metric)[1], err_msg=kind)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
def test_scan_scores_stay_within_the_error_bound(rng, precision, metric, scan_style):
    """Every scan score is within E_q of its float64 value: the bound the proofs rest on."""
    prec = _precision.choose(CPU, precision)
    metric = metric_of(metric)
    for kind, (xq, xb) in hard_datasets(rng).items():
        src = MatrixRows(torch.from_numpy(xb))
        center = bank_center(src, metric)
        xs = prepare(torch.from_numpy(xq), metric, center)
        bank = _prepared.PreparedBank(src, metric, center, CPU, scan_style, Workspace())
        tiles = [t.double().clone() for _, t in _scan.tiles(bank, xs, 512, prec)]
        radius2 = bank.radius2
        scores = torch.cat(tiles, 1)
        yp = prepare(torch.from_numpy(xb), metric, center).double()
        xd = xs.double()
        true = (yp * yp).sum(1) - 2 * xd @ yp.T if metric is L2 else -(xd @ yp.T)
        bound = _precision.error_bound(xs, radius2, metric, prec).unsqueeze(1)
        err = (scores - true).abs()
        assert bool((err <= bound).all()), f"{kind}: error {float((err / bound).max()):.2f} x bound"
        if kind == "randn":  # the bound is not vacuous either
            assert float((err / bound).max()) > 1e-3


def test_bf16_leftovers_go_to_fp32(rng, scan_style):
    """Queries bf16 cannot prove (clustered codes) are scanned again in fp32, and exact."""
    xq, xb = hard_datasets(rng)["clustered"]
    stats: Counter[str] = Counter()
    I = knn(xq, xb, 1, device="cpu", precision="bf16", stats=stats)[1]
    np.testing.assert_array_equal(I, brute_force(xq, xb, 1, "l2")[1])
    assert stats["bf16 k=1 proven"] < stats["bf16 k=1 scanned"] == len(xq)
    assert stats["fp32 k=1 scanned"] == len(xq) - stats["bf16 k=1 proven"]


def test_auto_picks_bf16_only_for_k1_on_native_hardware(monkeypatch):
    """'auto' is bf16 for k = 1 where the CPU has bf16 instructions, int8 on other CPUs
    (`tests/test_int8.py`), fp32 for k > 1."""
    monkeypatch.setattr(_precision, "_cpu_has_native_bf16", lambda: True)
    assert _precision.choose(CPU, "auto", 1) is _precision.BF16
    assert _precision.choose(CPU, "auto", 5).dtype == torch.float32
    monkeypatch.setattr(_precision, "_cpu_has_native_bf16", lambda: False)
    assert _precision.choose(CPU, "auto", 1) is _precision.INT8
    assert _precision.choose(CPU, "auto", 5).dtype == torch.float32
    assert _precision.choose(CPU, "fp16", 1).dtype == torch.float32  # no fp16 scan on a CPU
    with pytest.raises(ValueError, match="precision"):
        _precision.choose(CPU, "fp8")


def test_cuda_bf16_only_with_full_precision_reduction():
    """On CUDA, bf16 (asked for or 'auto') needs fp32 split-K sums; without them: fp32."""
    cuda, flags = torch.device("cuda"), torch.backends.cuda.matmul
    saved = flags.allow_bf16_reduced_precision_reduction
    try:
        flags.allow_bf16_reduced_precision_reduction = True
        assert _precision.choose(cuda, "bf16").dtype == torch.float32
        assert _precision.choose(cuda, "auto", 1).dtype == torch.float32
        flags.allow_bf16_reduced_precision_reduction = False
        assert _precision.choose(cuda, "bf16") is _precision.BF16
        assert _precision.choose(cuda, "auto", 1) is _precision.BF16
        assert _precision.choose(cuda, "auto", 5).dtype == torch.float32
    finally:
        flags.allow_bf16_reduced_precision_reduction = saved


def test_cuda_fp16_where_the_fused_kernel_runs():
    """On CUDA, k = 1 with the fused kernel: 'auto' and 'fp16' are fp16, whatever cuBLAS's
    reduced-precision flag (Triton sums in fp32); fp16 without the kernel is fp32."""
    cuda, flags = torch.device("cuda"), torch.backends.cuda.matmul
    saved = flags.allow_bf16_reduced_precision_reduction
    try:
        for reduced in (True, False):
            flags.allow_bf16_reduced_precision_reduction = reduced
            assert _precision.choose(cuda, "auto", 1, fused=True) is _precision.FP16
            assert _precision.choose(cuda, "fp16", 1, fused=True) is _precision.FP16
            assert _precision.choose(cuda, "fp16", 1).dtype == torch.float32
            assert _precision.choose(cuda, "fp16", 5, fused=True).dtype == torch.float32
    finally:
        flags.allow_bf16_reduced_precision_reduction = saved


def test_auto_remembers_per_bank_that_bf16_fails(rng, tmp_path, monkeypatch, scan_style):
    """After bf16 fails on a bank, 'auto' goes straight to fp32, and retries bf16 now and then."""
    monkeypatch.setattr(_precision, "_cpu_has_native_bf16", lambda: True)
    xq, xb = hard_datasets(rng)["clustered"]
    bank = Bank.create(tmp_path / "b", d=xb.shape[1])
    bank.add(xb)
    first: list[str] = []
    for _ in range(_precision.PROBE_EVERY + 1):
        stats: Counter[str] = Counter()
        monkeypatch.setattr(
            _prepared.PreparedBank, "count", lambda s, scan, n, p, st=stats: st.update({scan: n})
        )
        I = bank.nearest(xq, device="cpu")[1]
        np.testing.assert_array_equal(I, brute_force(xq, xb, 1, "l2")[1][:, 0])
        first.append(next(iter(stats)))
    assert first[0] == "bf16 k=1" and first[1] == "fp32 k=1"
    assert first.count("bf16 k=1") == 2  # the first call and one probe


def test_fp32_bound_follows_global_matmul_precision():
    """A process that allowed TF32/bf16 matmuls gets the looser bound those need."""
    try:
        torch.set_float32_matmul_precision("medium")
        assert _precision.choose(CPU, "fp32").u_in == _precision.BF16_U
        torch.set_float32_matmul_precision("high")
        assert _precision.choose(CPU, "fp32").u_in == _precision.TF32_U
    finally:
        torch.set_float32_matmul_precision("highest")
    assert _precision.choose(CPU, "fp32").u_in == 0.0


def test_cosine_of_huge_vectors_is_exact(rng):
    """Components near float32's limit (|x|^2 overflows float32) still normalise correctly."""
    xb = rng.standard_normal((300, 8)).astype(np.float32) * 1e30
    xq = rng.standard_normal((40, 8)).astype(np.float32) * 1e30
    for k in (1, 3):
        np.testing.assert_array_equal(
            knn(xq, xb, k, "cosine")[1], brute_force(xq, xb, k, "cosine")[1]
        )


@pytest.mark.parametrize("nq", [1, 5000])
@pytest.mark.parametrize("k", [1, 10])
def test_search_scratch_stays_under_24_mib(rng, monkeypatch, nq, k):
    """A search's scratch (its workspace) stays under the bound the _exact docstring states."""
    used: list[int] = []
    real = _exact._exact_search

    def spy(xq, bank, k, precision):
        out = real(xq, bank, k, precision)
        used.append(bank.ws.nbytes)
        return out

    monkeypatch.setattr(_exact, "_exact_search", spy)
    monkeypatch.setattr(_workspace, "_pool", [])  # fresh workspaces: nothing from other tests
    xb = rng.standard_normal((40_000, 256)).astype(np.float32)
    knn(xb[:nq] + 0.1, xb, k, device="cpu")
    assert used and max(used) < 24 << 20


def test_fp16_without_the_fused_kernel_scans_in_fp32(rng):
    """fp16 exists only in the fused GPU kernel: asked for elsewhere (a CPU, or top-k), the
    scan is fp32, exact."""
    xq, xb = hard_datasets(rng)["clustered"]
    for k in (1, 5):
        stats: Counter[str] = Counter()
        I = knn(xq, xb, k, device="cpu", precision=_precision.FP16, stats=stats)[1]
        np.testing.assert_array_equal(I, brute_force(xq, xb, k, "l2")[1])
        assert not any(key.startswith("fp16") for key in stats), stats
        assert stats[next(iter(stats))] == len(xq) and next(iter(stats)).startswith("fp32")
