"""What the client's methods return: frozen dataclasses read from the server's JSON.

Reading is lenient where a newer server may differ: unknown keys are ignored, optional fields
may be absent, and a state this client does not know stays readable (an enum value outside the
listed members, equal to its string). Each result keeps the JSON it was read from as `raw`; for
code written when the methods returned dicts, `result["key"]` reads `raw` as it was sent.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from .._wire_names import IndexPhase, SweepPhase, WireEnum

__all__ = [
    "BankInfo",
    "Health",
    "IndexInfo",
    "IndexPhase",
    "NearestResult",
    "SearchResult",
    "SweepPhase",
    "TradeoffJob",
    "TradeoffPoint",
    "TradeoffReport",
    "UsageSummary",
]

E = TypeVar("E", bound=WireEnum)


def phase(cls: type[E], value: object) -> E:
    """The member of `cls` named by `value`; a value this client does not know (a state added
    by a newer server) becomes a value of `cls` outside its members, equal to the string."""
    text = str(value)
    try:
        return cls(text)
    except ValueError:
        unknown = str.__new__(cls, text)
        unknown._name_, unknown._value_ = text.upper().replace(" ", "_"), text
        return unknown


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def _doc(v: Any) -> dict[str, Any]:
    """A JSON object, or {} for anything else (absent, null)."""
    return v if isinstance(v, dict) else {}


def _per_batch(v: Any) -> dict[int, float]:
    """{"64": 1234.5} -> {64: 1234.5}: measures per batch size (JSON keys are strings)."""
    return {int(k): float(x) for k, x in _doc(v).items() if str(k).isdigit() and x is not None}


@dataclass(frozen=True)
class _FromJSON:
    """A result read from a JSON object, kept as `raw` (not compared, not in the repr)."""

    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, kw_only=True)

    def __getitem__(self, key: str) -> Any:
        """The JSON field as the server sent it (`info["count"]`); prefer the attributes."""
        return self.raw[key]

    def __contains__(self, key: object) -> bool:
        return key in self.raw

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)


@dataclass(frozen=True)
class Health(_FromJSON):
    """`/healthz` (`status` "ok") or `/readyz` (`status` "ready", with the number of banks)."""

    status: str
    banks: int | None = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Health:
        return cls(str(doc["status"]), _int(doc.get("banks")), raw=doc)


@dataclass(frozen=True)
class IndexInfo(_FromJSON):
    """A bank's approximate index: the build under way, or the index that serves (ready) or
    served until a write (stale). While one serves: nprobe, k_factor, nlist, ntotal, the
    `bytes` it holds in RAM (and per vector), and who re-ranks its shortlist (`rerank`:
    "bank", from the bank's rows, or "index", its own RFlat copy)."""

    spec: str
    state: IndexPhase
    progress: float = 0.0
    error: str | None = None
    bank_version: str | None = None
    build_seconds: float | None = None
    nprobe: int | None = None
    k_factor: float | None = None
    nlist: int | None = None
    ntotal: int | None = None
    bytes: int | None = None
    bytes_per_vector: float | None = None
    rerank: str | None = None

    @property
    def ready(self) -> bool:
        return self.state is IndexPhase.READY

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> IndexInfo:
        return cls(
            str(doc["spec"]),
            phase(IndexPhase, doc["state"]),
            float(doc.get("progress") or 0.0),
            _str(doc.get("error")),
            _str(doc.get("bank_version")),
            _float(doc.get("build_seconds")),
            _int(doc.get("nprobe")),
            _float(doc.get("k_factor")),
            _int(doc.get("nlist")),
            _int(doc.get("ntotal")),
            _int(doc.get("bytes")),
            _float(doc.get("bytes_per_vector")),
            _str(doc.get("rerank")),
            raw=doc,
        )


@dataclass(frozen=True)
class UsageSummary(_FromJSON):
    """How the codes served by `nearest` were used over the usage window."""

    window: int
    served: int
    in_window: int
    distinct: int
    perplexity: float
    dead_codes: int

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> UsageSummary:
        return cls(
            int(doc.get("window", 0)),
            int(doc.get("served", 0)),
            int(doc.get("in_window", 0)),
            int(doc.get("distinct", 0)),
            float(doc.get("perplexity", 0.0)),
            int(doc.get("dead_codes", 0)),
            raw=doc,
        )


@dataclass(frozen=True)
class TradeoffPoint(_FromJSON):
    """One measured setting: exact, or `spec` with its search parameters. `qps`, `p50_ms` and
    `p99_ms` are per batch size."""

    spec: str
    recall_1_at_1: float
    recall_10_at_10: float
    nprobe: int | None = None
    k_factor: float | None = None
    qps: Mapping[int, float] = field(default_factory=dict)
    p50_ms: Mapping[int, float] = field(default_factory=dict)
    p99_ms: Mapping[int, float] = field(default_factory=dict)
    build_seconds: float = 0.0
    bytes_per_vector: float = 0.0
    pareto: bool = False
    label: str = ""

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TradeoffPoint:
        return cls(
            str(doc["spec"]),
            float(doc["recall_1_at_1"]),
            float(doc["recall_10_at_10"]),
            _int(doc.get("nprobe")),
            _float(doc.get("k_factor")),
            _per_batch(doc.get("qps")),
            _per_batch(doc.get("p50_ms")),
            _per_batch(doc.get("p99_ms")),
            float(doc.get("build_seconds") or 0.0),
            float(doc.get("bytes_per_vector") or 0.0),
            bool(doc.get("pareto", False)),
            str(doc.get("label", doc["spec"])),
            raw=doc,
        )


@dataclass(frozen=True)
class TradeoffReport(_FromJSON):
    """A bank's measured recall/speed curve and what it was measured under (`machine` and the
    rest of the conditions are in `raw`)."""

    points: tuple[TradeoffPoint, ...]
    primary_batch: int | None = None
    k: int | None = None
    n_queries: int | None = None
    nb: int | None = None
    d: int | None = None
    metric: str | None = None
    device: str | None = None
    created: str | None = None
    query_source: str | None = None
    bank_version: str | None = None
    index_spec: str | None = None
    bank: str | None = None
    served_by: str | None = None  # "server", or "N shards" for a bank on a cluster

    @property
    def pareto(self) -> tuple[TradeoffPoint, ...]:
        """The points on the Pareto frontier (1-recall@1 against QPS at `primary_batch`)."""
        return tuple(p for p in self.points if p.pareto)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TradeoffReport:
        return cls(
            tuple(TradeoffPoint.from_json(p) for p in doc.get("points") or ()),
            _int(doc.get("primary_batch")),
            _int(doc.get("k")),
            _int(doc.get("n_queries")),
            _int(doc.get("nb")),
            _int(doc.get("d")),
            _str(doc.get("metric")),
            _str(doc.get("device")),
            _str(doc.get("created")),
            _str(doc.get("query_source")),
            _str(doc.get("bank_version")),
            _str(doc.get("index_spec")),
            _str(doc.get("bank")),
            _str(doc.get("served_by")),
            raw=doc,
        )


@dataclass(frozen=True)
class TradeoffJob(_FromJSON):
    """A bank's tradeoff sweep: its `state` and `progress` (0 to 1), the `error` of a failed
    one; `report` (from `get_tradeoff`: None until one was measured) and `measured` (in the
    bank info) when the answer has them."""

    state: SweepPhase
    progress: float = 0.0
    error: str | None = None
    measured: bool | None = None
    report: TradeoffReport | None = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TradeoffJob:
        measured, report = doc.get("measured"), doc.get("report")
        return cls(
            phase(SweepPhase, doc["state"]),
            float(doc.get("progress") or 0.0),
            _str(doc.get("error")),
            None if measured is None else bool(measured),
            None if not isinstance(report, dict) else TradeoffReport.from_json(report),
            raw=doc,
        )


@dataclass(frozen=True)
class BankInfo(_FromJSON):
    """A bank: `count` vectors of `d` dims, its `version` (what `version=` pins), the ids'
    `max_id` (None when empty), its approximate `index` (None if never built), its `tradeoff`
    sweep, recorded `query_sample` size and code `usage` (None when the server keeps none), and
    how many `shards` its rows are split over."""

    name: str
    d: int
    count: int
    metric: str
    version: str
    bytes: int | None = None
    generation: int | None = None
    segments: int | None = None
    max_id: int | None = None
    index: IndexInfo | None = None
    tradeoff: TradeoffJob | None = None
    query_sample: int | None = None
    usage: UsageSummary | None = None
    shards: int = 1
    bytes_on_disk: int | None = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> BankInfo:
        index, tradeoff, usage = doc.get("index"), doc.get("tradeoff"), doc.get("usage")
        return cls(
            str(doc["name"]),
            int(doc["d"]),
            int(doc["count"]),
            str(doc["metric"]),
            str(doc["version"]),
            _int(doc.get("bytes")),
            _int(doc.get("generation")),
            _int(doc.get("segments")),
            _int(doc.get("max_id")),
            IndexInfo.from_json(index) if isinstance(index, dict) else None,
            TradeoffJob.from_json(tradeoff) if isinstance(tradeoff, dict) else None,
            _int(doc.get("query_sample")),
            UsageSummary.from_json(usage) if isinstance(usage, dict) else None,
            int(doc.get("shards", 1)),
            _int(doc.get("bytes_on_disk")),
            raw=doc,
        )


@dataclass
class SearchResult:
    """distances (nq, k) float32 and ids (nq, k) int64; unpacks as `D, I = result`. `version`:
    the bank version that answered; `setting`: which setting did (`exact`, or the index spec
    with its search parameters, as `X-Vqsearch-Setting` says)."""

    distances: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int64]
    version: str | None = None
    setting: str | None = None

    def __iter__(self) -> Iterator[npt.NDArray[Any]]:
        return iter((self.distances, self.ids))


@dataclass
class NearestResult:
    """codes (...) of each vector; quantized (z_q, the input's layout) and errors when asked.
    `version` and `setting` as in `SearchResult`."""

    codes: npt.NDArray[np.integer[Any]]
    quantized: npt.NDArray[np.floating[Any]] | None = None
    errors: npt.NDArray[np.floating[Any]] | None = None
    version: str | None = None
    setting: str | None = None
