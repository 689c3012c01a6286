"""On a CUDA device the search is still exactly float64 brute force (skipped without one)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tests.conftest import brute_force
from tests.test_precision import hard_datasets
from vqsearch.index import Bank, _scans, knn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
METRICS = ["l2", "ip", "cosine"]


@pytest.fixture(autouse=True)
def full_precision_reduction():
    """bf16 scans on CUDA need fp32 split-K sums, as the service sets them (`_precision`)."""
    flags = torch.backends.cuda.matmul
    saved = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    yield
    flags.allow_bf16_reduced_precision_reduction = saved


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 5])
def test_cuda_knn_equals_brute_force(rng, precision, metric, k):
    """Every precision, metric and hard data set: the ids are float64 brute force."""
    for kind, (xq, xb) in hard_datasets(rng).items():
        I = knn(xq, xb, k, metric, device="cuda", precision=precision)[1]
        np.testing.assert_array_equal(I, brute_force(xq, xb, k, metric)[1], err_msg=kind)


@pytest.mark.parametrize("k", [1, 4])
def test_cuda_tensors_in_many_blocks(rng, k):
    """Queries and bank already on the GPU, blocked over both, bf16 scan: exact."""
    xb = rng.standard_normal((3000, 40)).astype(np.float32)
    xq = (xb[rng.integers(0, 3000, 2000)] + 0.3 * rng.standard_normal((2000, 40))).astype(
        np.float32
    )
    stats: Counter[str] = Counter()
    xq_t, xb_t = torch.from_numpy(xq).cuda(), torch.from_numpy(xb).cuda()
    I = knn(xq_t, xb_t, k, device="cuda", tile_elems=1 << 18, precision="bf16", stats=stats)[1]
    np.testing.assert_array_equal(I, brute_force(xq, xb, k, "l2")[1])
    # k = 1: bf16 proves most, so every block scans in bf16; top-k: the first block does, and
    # drops bf16 for the rest when it proves under half (`_precision.WORTH_IT`).
    first = stats["bf16 k=1 scanned" if k == 1 else "bf16 k+2 scanned"]
    assert first == len(xq) if k == 1 else first > 0


@pytest.mark.parametrize("metric", METRICS)
def test_cuda_bank_search_and_nearest(rng, tmp_path, metric):
    """A bank on disk searched on the GPU (prepared copy there, re-rank on the CPU): exact."""
    xq, xb = hard_datasets(rng)["clustered"]
    bank = Bank.create(tmp_path / "b", d=xb.shape[1], metric=metric)
    bank.add(xb)
    bank.remove(np.arange(0, len(xb), 7))  # dead rows are skipped on the GPU too
    live = np.setdiff1d(np.arange(len(xb)), np.arange(0, len(xb), 7))
    ref = live[brute_force(xq, xb[live], 3, metric)[1]]
    np.testing.assert_array_equal(bank.search(xq, 3, device="cuda")[1], ref)
    np.testing.assert_array_equal(bank.nearest(xq, device="cuda")[1], ref[:, 0])


@pytest.mark.parametrize("metric", METRICS)
def test_cuda_host_queries_uploaded_in_chunks(rng, metric, monkeypatch):
    """Queries from host memory go up chunk by chunk, each searched as it lands; ids and
    distances (the one-pass exact kernel's) are float64 brute force."""
    monkeypatch.setattr(_scans, "HOST_CHUNK", 100)
    xb = rng.standard_normal((1000, 24)).astype(np.float32) + 2
    pick = rng.integers(0, 1000, 450)
    xq = (xb[pick] + 0.3 * rng.standard_normal((450, 24))).astype(np.float32)
    stats: Counter[str] = Counter()
    D, I = knn(xq, torch.from_numpy(xb).cuda(), 1, metric, device="cuda", stats=stats)
    want_d, want_i = brute_force(xq, xb, 1, metric)
    np.testing.assert_array_equal(I, want_i)
    np.testing.assert_allclose(D, want_d, rtol=1e-6, atol=1e-6)
    assert stats["fp16 k=1 scanned"] == 450
