"""The metrics, as strategy objects: everything the engine does differently per metric.

A metric says how the scan prepares rows and queries (centred on the bank mean for l2,
unit-norm for cosine), how a score is formed from the GEMM (``|y|^2 - 2 x.y`` for l2: a norm
bias and a factor of -2 on the queries' side; ``-x.y`` otherwise), its float64 formula for the
re-rank, the sign it reports to users, the faiss metric of approximate indexes, the id the
Triton kernel knows it by, and the shape of the scan's error bound (`_precision`). Scores are
'smaller is nearer' everywhere inside the engine.

Users and the wire name a metric by its string (`MetricName`); `metric_of` turns either into the
one `Metric` object of that name, at the engine's boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import faiss
import torch

from ._errors import UnknownMetricError, ZeroVectorError

MetricName = Literal["l2", "ip", "cosine"]


def normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    """Rows scaled to unit L2 norm; a zero row is an error (its cosine is undefined)."""
    # float64 norms: a float32 |x|^2 overflows for components beyond ~1e19 (then x / inf = 0).
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float64)
    if bool((norms == 0).any()):
        bad = int((norms[:, 0] == 0).nonzero()[0, 0])
        raise ZeroVectorError(f"{name} row {bad} is a zero vector; cosine is undefined for it")
    return (x / norms).to(x.dtype)


@dataclass(frozen=True, eq=False)
class Metric:
    """One metric (the three instances below are the only ones; compare with `is`)."""

    name: MetricName
    kernel_id: int  # the Triton exact kernel's METRIC
    faiss_metric: int
    centred: bool  # the scan centres both sides on the bank mean (`_rows.bank_center`)
    unit: bool  # both sides are normalised first
    query_scale: float  # the queries' GEMM factor: score = query_scale x.y (+ |y|^2)

    @property
    def norm_bias(self) -> bool:
        """Whether a score adds the row's squared norm (l2: ``|y|^2 - 2 x.y``)."""
        return self.centred

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Metric({self.name!r})"

    def __reduce__(self) -> tuple[object, tuple[str]]:
        # unpickled (in a shard's process) as the same instance: compared with `is`
        return metric_of, (self.name,)

    def prepare(
        self, y: torch.Tensor, center: torch.Tensor | None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A bank or query block as the float32 scan sees it: centred (l2, into `out` when
        given: scratch reuse) or unit-norm (cosine)."""
        if self.unit:
            return normalize(y, "vectors")
        if center is not None:
            return torch.sub(y, center.to(y.device), out=out)
        return y

    def exact64(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """float64 distance (smaller is nearer) of x (q, d) to y (q, m, d), direct formula."""
        x, y = x.double().unsqueeze(1), y.double()
        if self.centred:
            return ((y - x) ** 2).sum(-1)
        if self.unit:
            x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            y = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        return -(y * x).sum(-1)

    def reported(self, D: torch.Tensor) -> torch.Tensor:
        """'Smaller is nearer' float64 -> what users get, float32: squared distances for l2,
        similarities for ip and cosine."""
        return (D if self.centred else -D).to(torch.float32)

    def bound(
        self, c: float, xn: torch.Tensor, radius: torch.Tensor, flushed: torch.Tensor
    ) -> torch.Tensor:
        """The scan's error bound (`_precision.norm_bound`) from its relative constant c, the
        queries' norms xn, the bank radius and the absolute term for flushed subnormals."""
        if self.centred:
            return c * (xn + radius) ** 2 + flushed
        if self.unit:  # unit vectors; normalising each side adds about (d + 3) u more
            return 2.0 * c + flushed
        return c * xn * radius + flushed


L2 = Metric("l2", 0, faiss.METRIC_L2, centred=True, unit=False, query_scale=-2.0)
IP = Metric("ip", 1, faiss.METRIC_INNER_PRODUCT, centred=False, unit=False, query_scale=-1.0)
COSINE = Metric("cosine", 2, faiss.METRIC_INNER_PRODUCT, centred=False, unit=True, query_scale=-1.0)
BY_NAME: dict[str, Metric] = {m.name: m for m in (L2, IP, COSINE)}
METRICS: tuple[str, ...] = tuple(BY_NAME)


def metric_of(metric: object) -> Metric:
    """The Metric of a name (or the Metric itself); UnknownMetricError otherwise."""
    if isinstance(metric, Metric):
        return metric
    found = BY_NAME.get(metric) if isinstance(metric, str) else None
    if found is None:
        raise UnknownMetricError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return found
