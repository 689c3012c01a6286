"""Scratch tensors reused from one search to the next.

torch has no caching allocator on the CPU: every multi-MiB tensor a search allocates is fresh
memory whose pages the kernel faults in one by one, and under the service's allocator settings
(large blocks are unmapped when freed: `vqsearch.service._observe.return_freed_memory`) that
happens on every call. A search borrows a workspace for its duration; a few are kept for the
next.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch

KEEP = 2  # workspaces kept between searches (each under 24 MiB)


class Workspace:
    """Named scratch tensors of one search; a name's tensor grows as needed and is reused."""

    def __init__(self) -> None:
        self._tensors: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def get(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """An uninitialised tensor of this shape, valid until `get` is called again for the
        same name."""
        device = device or torch.device("cpu")
        key = (name, dtype, str(device))
        n = math.prod(shape)
        t = self._tensors.get(key)
        if t is None or t.numel() < n:
            t = self._tensors[key] = torch.empty(n, dtype=dtype, device=device)
        return t[:n].view(shape)


_pool: list[Workspace] = []
_lock = threading.Lock()


@contextlib.contextmanager
def borrow() -> Iterator[Workspace]:
    """A workspace for the duration of one search (concurrent searches get different ones)."""
    with _lock:
        ws = _pool.pop() if _pool else Workspace()
    try:
        yield ws
    finally:
        with _lock:
            if len(_pool) < KEEP:
                _pool.append(ws)
