"""The search engine: banks, exact torch search, faiss approximate search, evaluation.

No HTTP here; `vqsearch.service` builds on this package and never the other way round.
"""

from ._bank import Bank
from ._errors import (
    CorruptBankError,
    DimensionError,
    DTypeError,
    DuplicateIdError,
    EmptyBankError,
    FactoryStringError,
    InvalidIdError,
    InvalidInputError,
    KOutOfRangeError,
    NonFiniteError,
    RankError,
    StorageError,
    UnknownIdError,
    UnknownMetricError,
    VQSearchError,
    ZeroVectorError,
)
from ._eval import (
    Timing,
    ground_truth,
    k_recall_at_k,
    nearest_agreement,
    one_recall_at,
    time_search,
)
from ._knn import knn
from ._merge import merge_shards
from ._pq import TRAIN_SIZE, ApproxIndex, check_spec, default_spec
from ._proposed import search_index, search_proposed, search_proposed64
from ._storage import write_bytes as atomic_write
from ._tradeoff import pareto_front, perturbed_queries, pick, sweep
from ._validate import METRICS, Metric, MetricName, Queries, as_tensor, check_k

__all__ = [
    "METRICS",
    "TRAIN_SIZE",
    "ApproxIndex",
    "Bank",
    "CorruptBankError",
    "DTypeError",
    "DimensionError",
    "DuplicateIdError",
    "EmptyBankError",
    "FactoryStringError",
    "InvalidIdError",
    "InvalidInputError",
    "KOutOfRangeError",
    "Metric",
    "MetricName",
    "NonFiniteError",
    "Queries",
    "RankError",
    "StorageError",
    "Timing",
    "UnknownIdError",
    "UnknownMetricError",
    "VQSearchError",
    "ZeroVectorError",
    "as_tensor",
    "atomic_write",
    "check_k",
    "check_spec",
    "default_spec",
    "ground_truth",
    "k_recall_at_k",
    "knn",
    "merge_shards",
    "nearest_agreement",
    "one_recall_at",
    "pareto_front",
    "perturbed_queries",
    "pick",
    "search_index",
    "search_proposed",
    "search_proposed64",
    "sweep",
    "time_search",
]
