"""An immutable snapshot of a bank's rows; also the row source the exact search scans."""

from __future__ import annotations

import functools
import hashlib
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._errors import UnknownIdError
from ._metric import Metric
from ._rows import PREPARED_CACHE_BYTES, bank_center, prepare_whole


@dataclass(frozen=True, eq=False)
class Segment:
    name: str
    vectors: np.ndarray  # (n, d) float32, memory-mapped when loaded: what scans stream
    ids: np.ndarray  # (n,) int64
    content: str  # sha256 of the raw vector and id bytes: what the bank version is made of
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, once on disk
    scattered: np.ndarray = field(init=False, repr=False)  # the same rows, for `take`

    def __post_init__(self) -> None:
        object.__setattr__(self, "scattered", random_access(self.vectors))


def random_access(a: np.ndarray) -> np.ndarray:
    """A memory-mapped array's file mapped again, advised MADV_RANDOM, for reading rows here
    and there (a re-rank's candidates): a fault then reads the row's pages only, not a
    readahead window around them, which under memory pressure (a cgroup smaller than the
    bank) evicts the rows faster than they are used. The page cache is shared by both maps;
    scans keep the first one and its readahead. Anything else is returned as it is."""
    if not isinstance(a, np.memmap) or a.filename is None or a.size == 0:
        return a
    if not hasattr(mmap, "MADV_RANDOM"):  # not on every platform
        return a
    try:
        with open(a.filename, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError:  # removed since `a` was mapped (a compaction superseded it): `a` serves
        return a
    mm.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mm, a.dtype, a.size, a.offset).reshape(a.shape)


@dataclass(frozen=True, eq=False)
class State:
    """Rows 0..n-1 over the segments in order; dead rows stay until a compaction drops them."""

    d: int
    segments: tuple[Segment, ...]
    dead: np.ndarray  # (n_rows,) bool
    generation: int
    _centers: dict[str, torch.Tensor | None] = field(default_factory=dict)
    _prepared: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    hints: dict[str, list[float]] = field(default_factory=dict)  # see _precision.resolve
    packed: dict[str, Any] = field(default_factory=dict)  # per metric name: Int8NearestScan.of
    stamp: str | None = None  # the version, as the writes that made these rows set it (Bank)

    @property
    def device(self) -> torch.device:
        """Segments are memory maps (or arrays) in host memory."""
        return torch.device("cpu")

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        return np.cumsum([0] + [len(s.ids) for s in self.segments])

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    @functools.cached_property
    def all_ids(self) -> np.ndarray:
        if not self.segments:
            return np.empty(0, np.int64)
        return np.concatenate([s.ids for s in self.segments])

    @functools.cached_property
    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.dead)

    @functools.cached_property
    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """Live ids sorted, and the row of each: the id -> row lookup."""
        ids = self.all_ids[self.live_rows]
        order = np.argsort(ids, kind="stable")
        return ids[order], self.live_rows[order]

    @property
    def ntotal(self) -> int:
        return len(self.live_rows)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the given live ids; raises UnknownIdError naming the missing ones."""
        rows, found = self.rows_where(ids)
        if not found.all():
            raise UnknownIdError(f"unknown ids: {ids[~found][:10].tolist()}")
        return rows

    def rows_where(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found) for ids (n,): the row of each live id, 0 where found is False (an id
        never added, deleted, or -1)."""
        sorted_ids, rows = self._index
        if not len(sorted_ids):
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        pos = np.searchsorted(sorted_ids, ids).clip(0, len(sorted_ids) - 1)
        found = sorted_ids[pos] == ids
        return np.where(found, rows[pos], 0), found

    def blocks(self, bs: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        any_dead = bool(self.dead.any())
        for seg, off in zip(self.segments, self.offsets, strict=False):
            for a in range(0, len(seg.ids), bs):
                b = min(a + bs, len(seg.ids))
                dead = torch.from_numpy(self.dead[off + a : off + b]) if any_dead else None
                yield int(off + a), torch.from_numpy(seg.vectors[a:b]), dead

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows (any shape) as a tensor of shape rows.shape + (d,), read in file order."""
        r = rows.reshape(-1).numpy()
        order = np.argsort(r, kind="stable")
        out = np.empty((len(r), self.d), np.float32)
        sorted_rows = r[order]
        seg_of = np.searchsorted(self.offsets, sorted_rows, side="right") - 1
        for s in np.unique(seg_of):
            m = seg_of == s
            out[order[m]] = self.segments[s].scattered[sorted_rows[m] - self.offsets[s]]
        return torch.from_numpy(out).reshape(*rows.shape, self.d)

    def ids(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.all_ids[rows.numpy()])

    def center(self, metric: Metric) -> torch.Tensor | None:
        if metric.name not in self._centers:
            self._centers[metric.name] = bank_center(self, metric)
        return self._centers[metric.name]

    def prepared(
        self,
        metric: Metric,
        center: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The whole bank prepared for the scan (rows in dtype, float32 squared norms, dead
        mask), cached per dtype, when it fits PREPARED_CACHE_BYTES."""
        if self.n * (self.d * dtype.itemsize + 4) > PREPARED_CACHE_BYTES or self.n == 0:
            return None
        key = (metric.name, str(device), str(dtype))
        if key not in self._prepared:
            blocks = (y for _, y, _ in self.blocks(1 << 16))
            yp, yn = prepare_whole(blocks, metric, center, device, dtype)
            dead = torch.from_numpy(self.dead).to(device) if self.dead.any() else None
            self._prepared[key] = (yp, yn, dead)
        return self._prepared[key]

    @property
    def version(self) -> str:
        """What identifies these rows: a hash chained over the writes that made them (`stamp`,
        kept by a compaction, which changes no row), or for rows with no such history the hash
        of the segments' content and dead rows."""
        return self.stamp if self.stamp is not None else self._content_version

    @functools.cached_property
    def _content_version(self) -> str:
        """(a snapshot never changes: computed once, not on every answer that carries it)"""
        h = hashlib.sha256()
        for s in self.segments:
            h.update(s.content.encode())
        h.update(np.flatnonzero(self.dead).tobytes())
        return h.hexdigest()[:16]


def content_sha(vectors: np.ndarray, ids: np.ndarray) -> str:
    # the buffers themselves (hashlib reads any C-contiguous buffer): no copy of the rows
    h = hashlib.sha256(np.ascontiguousarray(vectors).data)
    h.update(np.ascontiguousarray(ids).data)
    return h.hexdigest()
