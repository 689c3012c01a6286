"""Exceptions raised by the search engine.

One class per kind of problem, so that callers (the HTTP service among them) can map each to its
own answer without parsing messages::

    VQSearchError
    ├── InvalidInputError (ValueError)   the caller passed something unusable
    │   ├── DimensionError               vectors of the wrong width d
    │   ├── RankError                    an array of the wrong number of axes
    │   ├── NonFiniteError               NaN or Inf in the input
    │   ├── DTypeError                   a non-numeric dtype
    │   ├── KOutOfRangeError             k < 1 or k > nb
    │   ├── EmptyBankError               searching a bank that holds no vector
    │   ├── UnknownMetricError           a metric other than l2, ip, cosine
    │   ├── FactoryStringError           a faiss index_factory string faiss refuses
    │   ├── ZeroVectorError              a zero vector under the cosine metric
    │   └── InvalidIdError               an id that is negative or not an integer
    │       ├── DuplicateIdError         an id that the bank (or the batch) already holds
    │       └── UnknownIdError           an id that the bank does not hold
    └── StorageError                     the bank on disk cannot be used
        └── CorruptBankError             a truncated, altered or inconsistent file
"""

from __future__ import annotations

__all__ = [
    "CorruptBankError",
    "DTypeError",
    "DimensionError",
    "DuplicateIdError",
    "EmptyBankError",
    "FactoryStringError",
    "InvalidIdError",
    "InvalidInputError",
    "KOutOfRangeError",
    "NonFiniteError",
    "RankError",
    "StorageError",
    "UnknownIdError",
    "UnknownMetricError",
    "VQSearchError",
    "ZeroVectorError",
]


class VQSearchError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidInputError(VQSearchError, ValueError):
    """The caller passed something the engine cannot use."""


class DimensionError(InvalidInputError):
    pass


class RankError(InvalidInputError):
    pass


class NonFiniteError(InvalidInputError):
    pass


class DTypeError(InvalidInputError):
    pass


class KOutOfRangeError(InvalidInputError):
    pass


class EmptyBankError(InvalidInputError):
    pass


class UnknownMetricError(InvalidInputError):
    pass


class FactoryStringError(InvalidInputError):
    pass


class ZeroVectorError(InvalidInputError):
    pass


class InvalidIdError(InvalidInputError):
    pass


class DuplicateIdError(InvalidIdError):
    pass


class UnknownIdError(InvalidIdError):
    pass


class StorageError(VQSearchError):
    """A bank directory cannot be read or written."""


class CorruptBankError(StorageError):
    """A bank file is truncated, altered, or disagrees with its manifest."""
