"""A bank as one exact search sees it: its rows, metric, centre, device and scratch.

Every candidate scan of a search (`_scans`) reads the bank through one `PreparedBank`: the row
source with its caches (prepared copies, the int8 packing, the precision history of 'auto'),
the metric and the centre the l2 scan subtracts, the device the scans run on and the workspace
their scratch comes from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ._metric import Metric
from ._rows import RowSource
from ._workspace import Workspace


@dataclass
class PreparedBank:
    """One search's view of a row source (see the module docstring).

    radius2 is the largest squared norm of a prepared row (float32, on `device`) that any scan
    of this search has seen: every scan passes over the whole bank before it reads its bound,
    so it is complete when read. gpu: whether scans run the GPU way (`_scan.gpu_style`)."""

    src: RowSource
    metric: Metric
    center: torch.Tensor | None
    device: torch.device
    gpu: bool
    ws: Workspace
    tile_elems: int | None = None
    stats: Counter[str] | None = None
    radius2: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.radius2 = torch.zeros((), device=self.device)

    @property
    def home(self) -> torch.device:
        """Where the rows live: the re-rank runs there and the results live there."""
        return self.src.device

    @property
    def n(self) -> int:
        return self.src.n

    @property
    def d(self) -> int:
        return self.src.d

    def saw(self, norms: torch.Tensor) -> None:
        """Fold the squared norms of prepared rows into `radius2` (no sync with the host)."""
        if norms.numel():
            torch.maximum(self.radius2, norms.max(), out=self.radius2)

    def count(self, scan: str, scanned: int, proven: int) -> None:
        """Tally, per scan, the queries it scanned and those it proved (the rest went on)."""
        if self.stats is not None:
            self.stats[f"{scan} scanned"] += scanned
            self.stats[f"{scan} proven"] += proven
