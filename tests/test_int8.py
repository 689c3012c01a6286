"""int8 candidate scans (CPUs without native bf16): exact, with an error bound that bounds."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tests.conftest import brute_force
from tests.test_precision import hard_datasets
from vqsearch.index import Bank, _exact, _int8, _precision, knn
from vqsearch.index._metric import L2, metric_of
from vqsearch.index._rows import MatrixRows, bank_center, prepare
from vqsearch.index._workspace import Workspace

METRICS = ["l2", "ip", "cosine"]
CPU = torch.device("cpu")


@pytest.fixture
def int8_always(monkeypatch):
    """int8 for every block of every search, whatever its size or proven fraction; skipped
    where this CPU's oneDNN kernel fails the exactness check (then int8 never runs)."""
    if not _int8.supported(CPU, 1, 1) or not _int8.exact_on(256, 512, 24):
        pytest.skip("oneDNN's int8 kernel is not available or not exact on this CPU")
    monkeypatch.setattr(_int8, "MIN_QUERIES", 1)
    monkeypatch.setattr(_exact, "WORTH_IT", 0.0)


def coded(rng: np.random.Generator, nq: int = 600, nb: int = 3000, d: int = 32):
    """Queries that are bank rows plus noise: a clear nearest row, as for a VQ tokenizer."""
    xb = rng.standard_normal((nb, d)).astype(np.float32)
    xq = xb[rng.integers(0, nb, nq)] + 0.3 * rng.standard_normal((nq, d))
    return xq.astype(np.float32), xb


@pytest.mark.parametrize("metric", METRICS)
def test_int8_equals_float64_brute_force(rng, metric, int8_always):
    """With int8 candidates the nearest ids are float64 brute force on every hard data set."""
    sets = {**hard_datasets(rng), "coded": coded(rng)}
    for kind, (xq, xb) in sets.items():
        stats: Counter[str] = Counter()
        I = knn(xq, xb, 1, metric, tile_elems=1 << 15, precision="int8", stats=stats)[1]
        np.testing.assert_array_equal(I, brute_force(xq, xb, 1, metric)[1], err_msg=kind)
        assert stats["int8 k=1 scanned"] == len(xq), kind
        # what int8 could not prove went on to fp32
        assert stats["fp32 k=1 scanned"] == len(xq) - stats["int8 k=1 proven"], kind


def test_int8_proves_most_queries_with_a_clear_nearest_code(rng, int8_always):
    """int8 does the work where it should: nearly every code-plus-noise query is proven."""
    xq, xb = coded(rng)
    stats: Counter[str] = Counter()
    I = knn(xq, xb, 1, precision="int8", stats=stats)[1]
    np.testing.assert_array_equal(I, brute_force(xq, xb, 1, "l2")[1])
    assert stats["int8 k=1 proven"] >= 0.95 * len(xq)


@pytest.mark.parametrize("metric", METRICS)
def test_int8_scores_stay_within_the_error_bound(rng, metric, int8_always):
    """Every int8 score is within E_q of its float64 value, and the bound is not vacuous."""
    fp32 = _precision.choose(CPU, "fp32")
    metric = metric_of(metric)
    for kind, (xq, xb) in {**hard_datasets(rng), "coded": coded(rng)}.items():
        src = MatrixRows(torch.from_numpy(xb))
        center = bank_center(src, metric)
        xs = prepare(torch.from_numpy(xq), metric, center)
        ws = Workspace()
        bank = _int8.pack(src, metric, center, ws)
        qz = _int8.quantize_queries(xs, metric, ws)
        assert qz is not None
        q, sx, l1, norm = qz
        scores = torch.cat([t.double().clone() for _, t in _int8.tiles(q, sx, bank, len(xs))], 1)
        yp = prepare(torch.from_numpy(xb), metric, center).double()
        xd = xs.double()
        true = (yp * yp).sum(1) - 2 * xd @ yp.T if metric is L2 else -(xd @ yp.T)
        base = _precision.error_bound(xs, bank.radius2, metric, fp32)
        bound = _int8.error_bound(sx, l1, norm, bank, base).unsqueeze(1)
        err = (scores - true).abs()
        assert bool((err <= bound).all()), f"{kind}: error {float((err / bound).max()):.2f} x bound"
        if kind in ("randn", "coded"):  # not vacuous: the errors reach a fair part of it
            assert float((err / bound).max()) > 0.02, kind


@pytest.fixture
def broken_kernel(monkeypatch):
    """oneDNN's int8 kernel off by 1e-3 relative, as a kernel that rounded weights would be."""
    real = _int8._scores
    monkeypatch.setattr(_int8, "_scores", lambda *a: real(*a) * (1 + 1e-3))
    _int8.exact_on.cache_clear()
    yield
    _int8.exact_on.cache_clear()


def test_a_kernel_that_is_not_exact_sends_the_scan_to_fp32(rng, monkeypatch, broken_kernel):
    """The kernel check rejects an inexact int8 GEMM; the search then runs fp32, still exact."""
    monkeypatch.setattr(_int8, "MIN_QUERIES", 1)
    assert not _int8.exact_on(256, 512, 24)
    xq, xb = coded(rng)
    stats: Counter[str] = Counter()
    I = knn(xq, xb, 1, precision="int8", stats=stats)[1]
    np.testing.assert_array_equal(I, brute_force(xq, xb, 1, "l2")[1])
    assert stats["fp32 k=1 scanned"] == len(xq) and not stats["int8 k=1 scanned"]


def test_small_batches_skip_int8(rng, int8_always, monkeypatch):
    """Below MIN_QUERIES queries the quantization costs more than it saves: fp32 scans."""
    monkeypatch.setattr(_int8, "MIN_QUERIES", 512)
    xq, xb = coded(rng, nq=100)
    stats: Counter[str] = Counter()
    knn(xq, xb, 1, precision="int8", stats=stats)
    assert stats["fp32 k=1 scanned"] == 100 and not stats["int8 k=1 scanned"]


def test_auto_picks_int8_for_k1_on_cpus_without_native_bf16(monkeypatch):
    """'auto' is int8 for k = 1 on a CPU without bf16 instructions; never for k > 1 or CUDA."""
    monkeypatch.setattr(_precision, "_cpu_has_native_bf16", lambda: False)
    assert _precision.choose(CPU, "auto", 1) is _precision.INT8
    assert _precision.choose(CPU, "int8", 1) is _precision.INT8
    assert _precision.choose(CPU, "auto", 5).dtype == torch.float32
    assert _precision.choose(CPU, "int8", 5).dtype == torch.float32
    assert _precision.choose(torch.device("cuda"), "int8", 1).dtype == torch.float32
    monkeypatch.setattr(_precision, "_cpu_has_native_bf16", lambda: True)
    assert _precision.choose(CPU, "auto", 1) is _precision.BF16


def test_a_bank_keeps_its_packed_copy_per_snapshot_and_skips_removed_rows(
    rng, tmp_path, int8_always
):
    """A bank packs once per snapshot; after a write the next snapshot packs afresh, and
    removed rows are never answered."""
    xq, xb = coded(rng)
    bank = Bank.create(tmp_path / "b", d=xb.shape[1])
    ids = bank.add(xb)
    I = bank.nearest(xq, device="cpu", precision="int8")[1]
    np.testing.assert_array_equal(I, ids[brute_force(xq, xb, 1, "l2")[1][:, 0]])
    first = bank._state.packed["l2"]
    bank.nearest(xq[:550], device="cpu", precision="int8")  # another batch size: same copy
    assert len(bank._state.packed) == 1 and bank._state.packed["l2"] is first
    gone = np.unique(I[:200])
    bank.remove(gone)
    live = ~np.isin(ids, gone)
    I = bank.nearest(xq, device="cpu", precision="int8")[1]
    np.testing.assert_array_equal(I, ids[live][brute_force(xq, xb[live], 1, "l2")[1][:, 0]])
    assert not np.isin(I, gone).any() and bank._state.packed["l2"] is not first


def test_tiny_and_zero_vectors_neither_crash_nor_weaken_the_scan(rng, int8_always):
    """Queries too small for an int8 scale go to fp32; a zero code row costs int8 no proofs."""
    xq, xb = coded(rng)
    tiny = np.zeros_like(xq)
    tiny[:, 0] = 1e-44
    I = knn(tiny, xb, 1, "ip", precision="int8")[1]
    np.testing.assert_array_equal(I, brute_force(tiny, xb, 1, "ip")[1])
    with_zero = np.vstack([xb, np.zeros((1, xb.shape[1]), np.float32)])
    stats: Counter[str] = Counter()
    I = knn(xq, with_zero, 1, precision="int8", stats=stats)[1]
    np.testing.assert_array_equal(I, brute_force(xq, with_zero, 1, "l2")[1])
    assert stats["int8 k=1 proven"] >= 0.95 * len(xq)
