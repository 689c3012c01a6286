"""Where the exact search reads bank vectors from: a plain matrix, or a bank's segments.

A row source numbers its rows 0..n-1 (dead rows included: they are skipped through a mask), hands
them out in blocks for the scan, gathers single rows for the re-rank, and maps rows to user ids.
It says where its rows live (the re-rank runs there) and may keep caches a search reuses: the
whole source prepared for the scan, the int8 packing, and the precision history of 'auto'.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ._metric import Metric
from ._workspace import Workspace


class RowSource(Protocol):
    @property
    def n(self) -> int: ...

    @property
    def d(self) -> int: ...

    @property
    def device(self) -> torch.device:
        """Where the rows live."""
        ...

    @property
    def hints(self) -> dict[str, list[float]] | None:
        """The precision history of 'auto' (`_precision.resolve`), or None: none kept."""
        ...

    @property
    def packed(self) -> dict[str, Any] | None:
        """The int8 packing per metric name (`_int8.PackedBank`), or None: none kept."""
        ...

    def prepared(
        self, metric: Metric, center: torch.Tensor | None, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The whole source prepared for the scan (rows in dtype, float32 squared norms, dead
        mask), cached; None where it is prepared block by block."""
        ...

    def blocks(self, bs: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Yield (r0, y (nbk, d) float32, dead (nbk,) bool or None) over rows r0..r0+nbk-1."""
        ...

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """Vectors of the given rows, float32, shape rows.shape + (d,)."""
        ...

    def ids(self, rows: torch.Tensor) -> torch.Tensor:
        """User ids (int64) of the given rows, same shape."""
        ...


@dataclass
class MatrixRows:
    """A plain (nb, d) float32 matrix whose ids are its row numbers."""

    xb: torch.Tensor

    def __post_init__(self) -> None:
        self.n, self.d = self.xb.shape
        self.device = self.xb.device
        self.hints: dict[str, list[float]] | None = None  # a plain matrix keeps no history
        self.packed: dict[str, Any] | None = None
        self._prepared: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor, None]] = {}

    def blocks(self, bs: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        for r0 in range(0, self.n, bs):
            yield r0, self.xb[r0 : r0 + bs], None

    def prepared(
        self,
        metric: Metric,
        center: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor, None] | None:
        """On a GPU, the matrix prepared for the scan once per search rather than once per
        query block (there each block's preparation is a handful of kernel launches), when it
        fits PREPARED_CACHE_BYTES: (rows in dtype, float32 squared norms, no dead mask). On a
        CPU, None: blocks prepared in scratch, in cache, cost no more and no memory."""
        if device.type == "cpu" or self.n * self.d * (4 + dtype.itemsize) > PREPARED_CACHE_BYTES:
            return None
        key = (metric.name, str(device), str(dtype))
        if key not in self._prepared:
            self._prepared[key] = (*prepare_whole([self.xb], metric, center, device, dtype), None)
        return self._prepared[key]

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        return self.xb[rows]

    def ids(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


def bank_center(src: RowSource, metric: Metric, sample: int = 2048) -> torch.Tensor | None:
    """The point the l2 scan centres both sides on, else None. Banks cache it.

    Any centre keeps the search exact; one near the mean makes the error bound smallest, so the
    mean of an evenly spaced sample of rows does. Where that mean is small against the spread,
    centring would gain little and cost a pass over every bank block the scan prepares."""
    if not metric.centred or src.n == 0:
        return None
    y = src.take(torch.arange(0, src.n, -(-src.n // sample))).double()
    mean = y.mean(0)
    spread2 = ((y - mean) ** 2).sum(1).mean()
    return mean.to(torch.float32) if bool(mean @ mean > 0.01 * spread2) else None


def prepare(
    y: torch.Tensor, metric: Metric, center: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`Metric.prepare`: the block as the float32 scan sees it."""
    return metric.prepare(y, center, out)


def prepare_whole(
    blocks: Iterable[torch.Tensor],
    metric: Metric,
    center: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole row source prepared once, from its blocks in order: (rows in dtype, float32
    squared norms), what a `prepared` cache holds."""
    parts = [prepare(y.to(device), metric, center) for y in blocks]
    yp = parts[0] if len(parts) == 1 else torch.cat(parts)
    return yp.to(dtype), (yp * yp).sum(1)


# Banks whose prepared copy (centred or normalised float32, plus squared norms) fits in this
# many bytes keep it per state: a query then skips the O(nb d) preparation, which for one
# query costs more than the scan itself. Larger banks prepare block by block, in bounded memory.
PREPARED_CACHE_BYTES = 256 << 20


def prepared_blocks(
    src: RowSource,
    bs: int,
    metric: Metric,
    center: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    ws: Workspace | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(r0, prepared rows (nbk, d) in dtype, their float32 squared norms (nbk,), dead (nbk,)
    or None). The rows are rounded to dtype from the float32 prepared rows. Each block is valid
    until the next is yielded: uncached blocks are prepared in reused buffers, because a fresh
    multi-MiB tensor per block costs more in page faults than the arithmetic."""
    ws = ws or Workspace()
    full = src.prepared(metric, center, device, dtype)
    if full is not None:
        yp_all, yn_all, dead_all = full
        for r0 in range(0, src.n, bs):
            dead = None if dead_all is None else dead_all[r0 : r0 + bs]
            yield r0, yp_all[r0 : r0 + bs], yn_all[r0 : r0 + bs], dead
        return
    bs = min(bs, src.n)
    ybuf = ws.get("rows", (bs, src.d), device=device)
    ynbuf = ws.get("norms", (bs,), device=device)
    lowbuf = ws.get("rows low", (bs, src.d), dtype, device) if dtype != ybuf.dtype else None
    for r0, y, dead in src.blocks(bs):
        nbk = y.shape[0]
        yp = prepare(y.to(device), metric, center, out=ybuf[:nbk])
        yn = torch.linalg.vector_norm(yp, dim=1, out=ynbuf[:nbk]).square_()
        low = yp if lowbuf is None else lowbuf[:nbk].copy_(yp)
        yield r0, low, yn, None if dead is None else dead.to(device)
