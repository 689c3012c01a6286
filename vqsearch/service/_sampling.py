"""A reservoir sample of a bank's real queries, for measuring recall on real traffic."""

from __future__ import annotations

import threading

import numpy as np


class Reservoir:
    """Uniform sample (Algorithm R) of at most `size` query vectors seen so far, in memory."""

    def __init__(self, size: int, d: int, seed: int = 0) -> None:
        self.size, self.seen = size, 0
        self.rows = np.empty((size, d), np.float32)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def offer(self, x: np.ndarray) -> None:
        """Offer a batch (m, d): the i-th vector ever seen is kept with probability size / i."""
        x = np.asarray(x, np.float32).reshape(-1, self.rows.shape[1])
        with self._lock:
            free = max(0, min(self.size - self.seen, len(x)))
            self.rows[self.seen : self.seen + free] = x[:free]
            rest = x[free:]
            if len(rest):
                seen_at = (
                    self.seen + free + 1 + np.arange(len(rest))
                )  # 1-based position in the stream
                slot = (self._rng.random(len(rest)) * seen_at).astype(np.int64)
                keep = slot < self.size
                # in stream order, so that a later vector replacing the same slot wins
                self.rows[slot[keep]] = rest[keep]
            self.seen += len(x)

    def sample(self) -> np.ndarray:
        with self._lock:
            return self.rows[: min(self.seen, self.size)].copy()
