"""faiss's heaps as the CPU top-k selection: the running top-k and the exact searches over it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import brute_force, datasets
from vqsearch.index import Bank, _heap, knn


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """Counts the tiles folded into heaps, so a test knows the heap path ran."""
    calls: list[int] = []
    real = _heap.Heaps.add
    monkeypatch.setattr(
        _heap.Heaps, "add", lambda self, t, r0: calls.append(1) or real(self, t, r0)
    )
    return calls


def _sorted(heaps: _heap.Heaps) -> tuple[torch.Tensor, torch.Tensor]:
    """The heaps' result best first, as the scan's caller sorts it."""
    vals, rows = heaps.result()
    vals, order = vals.sort(1)
    return vals, rows.gather(1, order)


def test_heaps_keep_the_smallest_scores_of_all_tiles(rng):
    """Tiles folded in one by one leave each row's kk smallest scores and their rows."""
    scores = torch.from_numpy(rng.standard_normal((37, 1000)).astype(np.float32))
    heaps = _heap.Heaps(37, 9)
    for r0 in range(0, 1000, 128):
        heaps.add(scores[:, r0 : r0 + 128].contiguous(), r0)
    vals, rows = _sorted(heaps)
    want, want_rows = scores.topk(9, dim=1, largest=False)
    torch.testing.assert_close(vals, want, rtol=0, atol=0)
    torch.testing.assert_close(rows, want_rows, rtol=0, atol=0)


def test_heaps_skip_dead_rows_and_report_empty_slots():
    """+inf (dead) scores are never kept; with fewer live rows than kk the rest is +inf, row 0."""
    tile = torch.tensor([[3.0, float("inf"), 1.0], [float("inf")] * 3])
    heaps = _heap.Heaps(2, 4)
    heaps.add(tile, 10)
    vals, rows = _sorted(heaps)
    assert vals[0, :2].tolist() == [1.0, 3.0] and rows[0, :2].tolist() == [12, 10]
    assert torch.isinf(vals[0, 2:]).all() and torch.isinf(vals[1]).all()
    assert (rows[0, 2:] == 0).all() and (rows[1] == 0).all()


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("kind", ["randn", "offset", "near_ties"])
def test_many_queries_through_the_heaps_equal_brute_force(rng, counted, metric, kind):
    """More queries than the bank-major limit take the heap path and stay exact."""
    xq, xb = datasets(rng, nq=300, nb=3000)[kind]
    D, I = knn(xq, xb, 7, metric)
    Dr, Ir = brute_force(xq, xb, 7, metric)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(D, Dr, rtol=1e-6, atol=1e-6 * float(np.abs(Dr).max()))
    assert counted


def test_heap_path_through_segments_and_tombstones(rng, counted):
    """Deleted rows never come back from the heaps, and few live rows fill what they can."""
    bank = Bank(16, "l2")
    parts = [rng.standard_normal((n, 16)).astype(np.float32) for n in (700, 13, 900)]
    for p in parts:
        bank.add(p)
    gone = rng.choice(1613, 600, replace=False)
    bank.remove(gone)
    live = np.setdiff1d(np.arange(1613), gone)
    xq = rng.standard_normal((400, 16)).astype(np.float32)
    D, I = bank.search(xq, 6)
    Dr, Ir = brute_force(xq, np.concatenate(parts)[live], 6, "l2")
    np.testing.assert_array_equal(I, live[Ir])
    np.testing.assert_allclose(D, Dr, rtol=1e-6)
    assert counted


def test_heaps_take_the_largest_finite_score():
    """A score of float32's largest finite value is kept: the heaps start at +inf, not at it."""
    heaps = _heap.Heaps(1, 2)
    heaps.add(torch.tensor([[float(np.finfo(np.float32).max), float("inf")]]), 0)
    vals, rows = heaps.result()
    assert sorted(vals[0].tolist()) == [np.finfo(np.float32).max, math.inf]
    assert rows[0].tolist() == [0, 0]  # row 0 holds the score; the empty slot reads row 0 too


def test_heaps_fold_wide_tiles_in_serial_calls(rng, monkeypatch):
    """Rows go to addn in calls of at most SERIAL_SCORES scores (faiss's OpenMP stays idle),
    and the result is the same as one call."""
    calls: list[int] = []
    real = _heap.faiss.float_maxheap_array_t.addn
    monkeypatch.setattr(
        _heap.faiss.float_maxheap_array_t,
        "addn",
        lambda self, nj, vin, j0, i0, ni: calls.append(nj * ni) or real(self, nj, vin, j0, i0, ni),
    )
    scores = torch.from_numpy(rng.standard_normal((300, 700)).astype(np.float32))
    heaps = _heap.Heaps(300, 5)
    heaps.add(scores, 0)
    assert len(calls) > 1 and max(calls) <= _heap.SERIAL_SCORES
    vals = _sorted(heaps)[0]
    torch.testing.assert_close(vals, scores.topk(5, dim=1, largest=False)[0], rtol=0, atol=0)
