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
from ._knn import knn
from ._validate import METRICS, Metric

__all__ = [
    "METRICS",
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
    "NonFiniteError",
    "RankError",
    "StorageError",
    "UnknownIdError",
    "UnknownMetricError",
    "VQSearchError",
    "ZeroVectorError",
    "knn",
]
