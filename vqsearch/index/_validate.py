"""Turning user input into float32 torch matrices, or one clear error saying why not."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._errors import (
    DimensionError,
    DTypeError,
    InvalidInputError,
    KOutOfRangeError,
    NonFiniteError,
    RankError,
)
from ._metric import METRICS, Metric, MetricName, metric_of, normalize

__all__ = [
    "METRICS",
    "Metric",
    "MetricName",
    "Queries",
    "as_matrix",
    "as_tensor",
    "check_k",
    "check_metric",
    "normalize",
    "resolve_device",
]


# What a non-numeric array holds, said as a user would say it (not numpy's dtype code).
_KINDS = {
    "U": "strings",
    "S": "bytes",
    "O": "mixed values (null, ragged nested lists, integers beyond 64 bits, or non-numbers)",
    "b": "booleans",
    "c": "complex numbers",
    "M": "dates",
    "m": "time deltas",
    "V": "structured records",
}


def check_metric(metric: Any) -> Metric:
    """The Metric of a user's metric name (or of a Metric); UnknownMetricError otherwise."""
    return metric_of(metric)


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """Any array-like of numbers -> torch tensor (no copy where none is needed); refuse the rest."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise DTypeError(f"{name} must hold numbers; got {x.dtype}")
        return x
    try:
        a = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise RankError(f"{name} is not a rectangular numeric array: {exc}") from exc
    if a.dtype.kind not in "iuf":
        raise DTypeError(f"{name} must hold numbers; got {_KINDS.get(a.dtype.kind, a.dtype)}")
    if not a.dtype.isnative:  # torch takes native byte order only
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype.kind == "u" and a.dtype.itemsize > 1:  # torch computes on uint8 only
        wide = a.dtype.itemsize == 8 and a.size and int(a.max()) > np.iinfo(np.int64).max
        a = a.astype(np.float64 if wide else np.int64)
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # a read-only memory map, say: shared, not copied
        # The engine never writes into its inputs (it writes only buffers and results of its
        # own), so torch's warning about tensors over read-only memory does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return torch.from_numpy(a)
    return torch.from_numpy(a)


def as_matrix(x: Any, name: str, d: int | None = None) -> torch.Tensor:
    """Array-like -> contiguous float32 tensor (n, d), checked for rank, width and finiteness."""
    t = as_tensor(x, name)
    if t.ndim != 2:
        raise RankError(f"{name} must be 2-D (n, d); got shape {tuple(t.shape)}")
    if d is not None and t.shape[1] != d:
        raise DimensionError(f"{name} has d={t.shape[1]}; expected d={d}")
    if t.shape[1] == 0:
        raise DimensionError(f"{name} has d=0; vectors need at least one component")
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    # aminmax propagates NaN and is a fraction of the cost of isfinite().all() on large inputs.
    lo, hi = torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(()))
    if not all(map(math.isfinite, torch.stack([lo, hi]).tolist())):  # one sync on a GPU
        raise NonFiniteError(f"{name} contains NaN or Inf (or values beyond float32 range)")
    return t.contiguous()


def check_k(k: Any, nb: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise KOutOfRangeError(f"k must be an integer; got {k!r}")
    if not 1 <= int(k) <= nb:
        raise KOutOfRangeError(f"k={k} is out of range: need 1 <= k <= nb={nb}")
    return int(k)


def check_k_factor(k_factor: Any) -> float:
    """A re-ranking shortlist's size over k: a number in [1, 1024] (not a bool)."""
    if isinstance(k_factor, bool) or not (
        isinstance(k_factor, (int, float)) and 1 <= k_factor <= 1024
    ):
        raise InvalidInputError(f"k_factor must be a number in [1, 1024]; got {k_factor!r}")
    return float(k_factor)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True, eq=False)
class Queries:
    """Query vectors validated once (`Queries.of`): float32 (nq, d), contiguous, finite, with
    unit rows under cosine. A `Bank` or `ApproxIndex` of the same d and metric searches them
    without checking again; slices and `join`s of validated queries stay validated."""

    x: torch.Tensor
    metric: Metric

    @classmethod
    def of(cls, xq: Any, d: int, metric: Metric | MetricName, name: str = "queries") -> Queries:
        m = check_metric(metric)
        if isinstance(xq, Queries):
            xq = xq.x
        x = as_matrix(xq, name, d)
        return cls(normalize(x, name) if m.unit else x, m)

    @classmethod
    def join(cls, parts: list[Queries]) -> Queries:
        return cls(torch.cat([p.x for p in parts]), parts[0].metric)

    @property
    def d(self) -> int:
        return int(self.x.shape[1])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, rows: slice) -> Queries:
        return Queries(self.x[rows], self.metric)

    def numpy(self) -> np.ndarray:
        return self.x.numpy()

    def trusted_by(self, d: int, metric: Metric | MetricName) -> torch.Tensor:
        """The rows, for a searcher of width d and this metric (else InvalidInputError)."""
        if d != self.d or metric_of(metric) is not self.metric:
            raise DimensionError(
                f"queries validated for d={self.d}, {self.metric}; searched with d={d}, {metric}"
            )
        return self.x
