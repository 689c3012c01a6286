"""Running top-k of a CPU scan in faiss's C++ heaps, fed the scan's score tiles.

A tile is a contiguous (bq, w) float32 block of scores (`_scan.tiles`, row-major CPU tiles).
faiss's ``HeapArray::addn`` walks it once per query row, comparing each score with the row's
heap top (its k-th best so far) and replacing the top on the rare score below it: one compiled
pass, where the torch selection (`_scan.scan_topk`) spends some thirty small ops per tile.

faiss's OpenMP is kept out: ``addn`` runs its rows in parallel above 100,000 scores per call,
and ``heapify`` and ``reorder`` always do (faiss/utils/Heap.cpp). With faiss imported before
torch, its OpenMP threads and torch's are two pools spinning on the same cores, several times
slower than either alone. So rows go in serial calls
of fewer scores, the heaps start as +inf (a valid heap) and the caller sorts the result.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

SERIAL_SCORES = 100_000  # addn's threshold for its OpenMP loop (faiss/utils/Heap.cpp)


class Heaps:
    """kk best (smallest) scores per query of bq queries, with their bank rows."""

    def __init__(self, bq: int, kk: int) -> None:
        # +inf, not faiss's FLT_MAX start, which would turn away a finite score of FLT_MAX
        self.vals = np.full((bq, kk), np.inf, dtype=np.float32)
        self.rows = np.full((bq, kk), -1, dtype=np.int64)
        self._h = faiss.float_maxheap_array_t()
        self._h.nh, self._h.k = bq, kk
        self._h.val, self._h.ids = faiss.swig_ptr(self.vals), faiss.swig_ptr(self.rows)

    def add(self, tile: torch.Tensor, r0: int) -> None:
        """Fold in a tile (bq, w), float32 on the CPU, whose column j is row r0 + j. Scores
        equal to a heap top are not taken (nor +inf, dead rows, nor NaN)."""
        a = tile.contiguous().numpy()  # addn reads rows w apart
        bq, w = a.shape
        step = max(1, SERIAL_SCORES // max(w, 1))
        for i0 in range(0, bq, step):
            ni = min(step, bq - i0)
            # faiss's stub omits addn's j0, i0 and ni (faiss/utils/Heap.h has them; tested)
            self._h.addn(w, faiss.swig_ptr(a[i0:]), r0, i0, ni)  # type: ignore[call-arg]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores float32 (bq, kk), rows (bq, kk)) in heap order, not sorted; slots never
        filled (fewer than kk live rows) score +inf with row 0."""
        vals, rows = torch.from_numpy(self.vals), torch.from_numpy(self.rows)
        return vals, rows.masked_fill_(rows < 0, 0)
