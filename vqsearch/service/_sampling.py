"""What a bank has been asked and answered: a sample of its real queries (for measuring recall
on real traffic) and the codes it served (for usage figures)."""

from __future__ import annotations

import math
import threading
from typing import Any

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


class Usage:
    """The last `window` codes served by a bank, for usage figures as VQ people track them.
    The buffer grows with what was served (doubling) up to the window, so many banks that
    served little hold little."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.buf = np.empty(0, np.int64)
        self.filled = 0  # codes in buf; once it reaches `window`, buf is a ring
        self.pos, self.served = 0, 0  # next ring slot; codes served in all
        self._lock = threading.Lock()

    def record(self, codes: np.ndarray) -> None:
        c = np.asarray(codes, np.int64).reshape(-1)
        n, c = len(c), c[-self.window :]  # older ones would be overwritten in this call
        with self._lock:
            if self.filled < self.window:
                take = min(len(c), self.window - self.filled)
                end = self.filled + take
                if end > len(self.buf):
                    grown = np.empty(min(self.window, max(end, 2 * len(self.buf), 1024)), np.int64)
                    grown[: self.filled] = self.buf[: self.filled]
                    self.buf = grown
                self.buf[self.filled : end] = c[:take]
                self.filled, c = end, c[take:]
                self.pos = end % self.window
            if len(c):  # full: overwrite the oldest
                end = self.pos + len(c)
                if end <= self.window:  # no wrap: one slice, no index array
                    self.buf[self.pos : end] = c
                else:
                    self.buf[(self.pos + np.arange(len(c))) % self.window] = c
                self.pos = end % self.window
            self.served += n

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, times served) over the window."""
        with self._lock:
            window = self.buf[: self.filled].copy()
        return np.unique(window, return_counts=True)

    def summary(self, live_ids: np.ndarray) -> dict[str, Any]:
        ids, n = self.counts()
        p = n / max(n.sum(), 1)
        used = np.isin(live_ids, ids).sum()
        return {
            "window": self.window,
            "served": self.served,
            "in_window": int(n.sum()),
            "distinct": len(ids),
            "perplexity": float(math.exp(-(p * np.log(p)).sum())) if len(p) else 0.0,
            "dead_codes": int(len(live_ids) - used),
        }
