"""Where an index build reads its rows: a matrix in memory, or a bank snapshot read block by
block from its (memory-mapped) segments, so that a build over a bank holds a training sample
and one block at a time, never the bank.

Both give the rows as the index must see them (normalised under cosine: a bank stores them so).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ._state import State

BLOCK_BYTES = 32 << 20  # rows handed to faiss's add at a time


@dataclass(frozen=True)
class MatrixRows:
    """xb (nb, d) float32 in memory, with ids (nb,)."""

    xb: np.ndarray
    ids: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.xb.shape[0]), int(self.xb.shape[1])

    def sample(self, rows: np.ndarray) -> np.ndarray:
        """The rows at positions `rows` (sorted) of 0..nb-1."""
        return np.ascontiguousarray(self.xb[rows])

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x (b, d), ids (b,)) over all rows, in order."""
        bs = max(1, BLOCK_BYTES // (4 * self.shape[1]))
        for a in range(0, self.shape[0], bs):
            yield np.ascontiguousarray(self.xb[a : a + bs]), self.ids[a : a + bs]


@dataclass(frozen=True)
class BankRows:
    """The live rows of a bank snapshot (its `State`), in storage order."""

    state: State

    @property
    def shape(self) -> tuple[int, int]:
        return self.state.ntotal, self.state.d

    def sample(self, rows: np.ndarray) -> np.ndarray:
        """The live rows at positions `rows` (sorted): read where they lie, in file order."""
        live = torch.from_numpy(self.state.live_rows[rows])
        return self.state.take(live).numpy()

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        s = self.state
        bs = max(1, BLOCK_BYTES // (4 * s.d))
        for off, y, dead in s.blocks(bs):
            ids = s.all_ids[off : off + len(y)]
            if dead is None:
                yield np.ascontiguousarray(y.numpy()), ids
            elif not bool(dead.all()):
                keep = ~dead.numpy()
                yield y.numpy()[keep], ids[keep]


IndexRows = MatrixRows | BankRows
