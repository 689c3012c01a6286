"""The setting that answers a query, as a value: what the batcher keys on, the header and
the JSON `setting` report, and what the engine is called with."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

EXACT = "exact"


@dataclass(frozen=True)
class Setting:
    """Exact search, or the bank's index `spec` with the search parameters that apply to it
    (`nprobe` for IVF; `k_factor`: a shortlist of k x k_factor is re-ranked). `mode=auto`
    also says what recall the pick measured, or why it answered exactly."""

    spec: str = EXACT
    nprobe: int | None = None
    k_factor: float | None = None
    measured_recall: float | None = None
    reason: str | None = None

    @property
    def exact(self) -> bool:
        return self.spec == EXACT

    @property
    def key(self) -> tuple[str, int | None, float | None]:
        """What decides the answer: requests with equal keys may share one search."""
        return (self.spec, self.nprobe, self.k_factor)

    @property
    def label(self) -> str:
        """`X-Vqsearch-Setting`: the spec and its parameters, `exact` for exact search."""
        params = [f"nprobe={self.nprobe}"] if self.nprobe is not None else []
        params += [f"k_factor={self.k_factor}"] if self.k_factor is not None else []
        return ";".join([self.spec, *params])

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}
