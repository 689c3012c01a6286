"""Exact search equals float64 brute force, whatever the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import brute_force, datasets
from vqsearch.index import _exact, knn

METRICS = ["l2", "ip", "cosine"]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", ["randn", "offset", "near_ties"])
@pytest.mark.parametrize("k", [1, 7])
def test_knn_equals_float64_brute_force(rng, metric, kind, k, scan_style):
    """Ids equal float64 brute force exactly and distances to float32 precision."""
    xq, xb = datasets(rng)[kind]
    # small tiles so that the scan really is blocked over queries and bank
    D, I = knn(xq, xb, k, metric, tile_elems=1 << 15)
    Dr, Ir = brute_force(xq, xb, k, metric)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(D, Dr, rtol=1e-6, atol=1e-6 * float(np.abs(Dr).max()))
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == (len(xq), k)


def test_float32_expansion_alone_would_be_wrong(rng):
    """The offset data defeats a plain float32 expansion, so the tests above mean something."""
    xq, xb = datasets(rng)["offset"]
    q, b = torch.from_numpy(xq), torch.from_numpy(xb)
    naive = ((q * q).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * q @ b.T).argmin(1).numpy()
    assert (naive != brute_force(xq, xb, 1, "l2")[1][:, 0]).mean() > 0.2


def test_exact_ties_go_to_lowest_id(rng, scan_style):
    """Duplicated bank rows tie exactly; the lowest row wins, in k=1 and top-k alike."""
    code = rng.standard_normal((40, 16)).astype(np.float32)
    xb = np.concatenate([code, code, code])  # each vector at rows r, r+40, r+80
    xq = code[rng.integers(0, 40, 30)] + 0.01 * rng.standard_normal((30, 16)).astype(np.float32)
    for metric in METRICS:
        _, I1 = knn(xq, xb, 1, metric)
        _, I3 = knn(xq, xb, 3, metric)
        Ir = brute_force(xq, xb, 3, metric)[1]
        np.testing.assert_array_equal(I3, Ir)
        np.testing.assert_array_equal(I1[:, 0], Ir[:, 0])
        assert (I3[:, 1] == I3[:, 0] + 40).all() and (I3[:, 2] == I3[:, 0] + 80).all()


def test_fallback_path_is_exact_when_ties_exceed_margin(rng, monkeypatch, scan_style):
    """More exact duplicates than the kept margin force the float64 scan; it is still exact."""
    calls = []
    real = _exact.scan64
    monkeypatch.setattr(_exact, "scan64", lambda *a: calls.append(1) or real(*a))
    code = rng.standard_normal((5, 8)).astype(np.float32)
    xb = np.repeat(code, 60, axis=0)[rng.permutation(300)]
    xq = code + 0.05 * rng.standard_normal((5, 8)).astype(np.float32)
    for k in (1, 4):
        I = knn(xq, xb, k, "l2")[1]
        np.testing.assert_array_equal(I, brute_force(xq, xb, k, "l2")[1])
    assert calls, "the float64 fallback was not exercised"


@pytest.mark.parametrize("metric", METRICS)
def test_k1_path_equals_topk_path(rng, metric):
    """The k=1 fast path gives the first column of the general top-k path."""
    xq, xb = datasets(rng, nq=300, nb=4000)["randn"]
    D1, I1 = knn(xq, xb, 1, metric, tile_elems=1 << 16)
    Dk, Ik = knn(xq, xb, 5, metric, tile_elems=1 << 16)
    np.testing.assert_array_equal(I1[:, 0], Ik[:, 0])
    np.testing.assert_array_equal(D1[:, 0], Dk[:, 0])


def test_torch_and_other_dtypes_accepted(rng):
    """Torch tensors and float16/float64/int inputs give the same answer as float32 numpy."""
    xq, xb = datasets(rng, nq=20, nb=300)["randn"]
    ref = knn(xq, xb, 3)[1]
    np.testing.assert_array_equal(knn(torch.from_numpy(xq), torch.from_numpy(xb), 3)[1], ref)
    np.testing.assert_array_equal(knn(xq.astype(np.float64), xb.astype(np.float64), 3)[1], ref)
    xi = (xb * 10).astype(np.int32)
    np.testing.assert_array_equal(knn(xi[:5], xi, 2)[1], brute_force(xi[:5], xi, 2, "l2")[1])


def test_l2_distances_clamped_nonnegative(rng):
    """A query equal to a bank row gets distance exactly 0, never negative."""
    xb = (rng.standard_normal((500, 32)) + 100).astype(np.float32)
    D, I = knn(xb[:50], xb, 1)
    assert (D >= 0).all() and (D[:, 0] == 0).all()
    np.testing.assert_array_equal(I[:, 0], np.arange(50))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_read_only_memory_maps_are_searched_in_place(tmp_path, rng, metric):
    """np.load(mmap_mode="r") arrays, queries and bank, as a user passes them: no warning
    (the suite turns warnings into errors), exact answers, and the files left as they were."""
    xq, xb = rng.standard_normal((30, 16)), rng.standard_normal((500, 16))
    np.save(tmp_path / "q.npy", xq.astype(np.float32))
    np.save(tmp_path / "b.npy", xb.astype(np.float32))
    q, b = np.load(tmp_path / "q.npy", mmap_mode="r"), np.load(tmp_path / "b.npy", mmap_mode="r")
    assert not q.flags.writeable
    _, I = knn(q, b, 3, metric)
    np.testing.assert_array_equal(I, brute_force(q, b, 3, metric)[1])
    np.testing.assert_array_equal(np.load(tmp_path / "q.npy"), xq.astype(np.float32))
