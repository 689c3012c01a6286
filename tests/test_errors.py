"""Every kind of bad input raises its own exception type with a message naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqsearch.index import (
    Bank,
    DimensionError,
    DTypeError,
    EmptyBankError,
    InvalidIdError,
    InvalidInputError,
    KOutOfRangeError,
    NonFiniteError,
    RankError,
    UnknownMetricError,
    knn,
)

XB = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)


@pytest.mark.parametrize(
    ("xq", "kwargs", "error", "words"),
    [
        (np.zeros((2, 5), np.float32), {}, DimensionError, "d=5"),
        (np.zeros(4, np.float32), {}, RankError, "2-D"),
        (np.zeros((1, 2, 4), np.float32), {}, RankError, "2-D"),
        (np.array([[0, np.nan, 0, 0]], np.float32), {}, NonFiniteError, "NaN"),
        (np.array([[0, np.inf, 0, 0]], np.float32), {}, NonFiniteError, "Inf"),
        (np.array([[0, 1e39, 0, 0]]), {}, NonFiniteError, "float32"),
        (np.zeros((1, 4), np.float32), {"k": 0}, KOutOfRangeError, "k=0"),
        (np.zeros((1, 4), np.float32), {"k": 21}, KOutOfRangeError, "nb=20"),
        (np.zeros((1, 4), np.float32), {"k": 1.5}, KOutOfRangeError, "integer"),
        (np.zeros((1, 4), np.float32), {"metric": "hamming"}, UnknownMetricError, "hamming"),
        (np.array([["a", "b", "c", "d"]]), {}, DTypeError, "numbers; got strings"),
        (np.zeros((1, 4), bool), {}, DTypeError, "booleans"),
        (torch.zeros((1, 4), dtype=torch.complex64), {}, DTypeError, "complex"),
        ([[1, 2], [3]], {}, RankError, "rectangular"),
    ],
)
def test_knn_bad_input(xq, kwargs, error, words):
    """knn refuses the input with the documented exception and a message that names it."""
    args = {"k": 1, "metric": "l2", **kwargs}
    with pytest.raises(error, match=words) as info:
        knn(xq, XB, **args)
    assert isinstance(info.value, InvalidInputError) and isinstance(info.value, ValueError)


def test_empty_inputs():
    """An empty bank is EmptyBankError; zero-width vectors are a DimensionError."""
    with pytest.raises(EmptyBankError):
        knn(np.zeros((1, 4), np.float32), np.zeros((0, 4), np.float32), 1)
    with pytest.raises(DimensionError):
        knn(np.zeros((1, 0), np.float32), np.zeros((3, 0), np.float32), 1)


def test_bank_bad_input():
    """Banks refuse bad d, metric, widths and k the same way."""
    with pytest.raises(RankError):
        Bank(0)
    with pytest.raises(UnknownMetricError):
        Bank(4, "manhattan")  # type: ignore[arg-type]
    bank = Bank(4)
    bank.add(XB)
    with pytest.raises(DimensionError):
        bank.add(np.zeros((1, 3), np.float32))
    with pytest.raises(KOutOfRangeError):
        bank.search(XB[:1], 21)
    with pytest.raises(RankError, match="ids"):
        bank.add(XB[:2], ids=[1])


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("k", [1, 3])
def test_empty_batches_have_empty_answers(metric, k):
    """No queries is valid input: (0, k) answers of the usual dtypes, from knn and a Bank."""
    xq = np.zeros((0, 4), np.float32)
    D, I = knn(xq, XB, k, metric=metric)
    assert D.shape == I.shape == (0, k) and D.dtype == np.float32 and I.dtype == np.int64
    bank = Bank(4, metric)
    bank.add(XB)
    D, I = bank.search(xq, k)
    assert D.shape == I.shape == (0, k) and D.dtype == np.float32 and I.dtype == np.int64
    D, I = bank.nearest(xq)
    assert D.shape == I.shape == (0,)


def test_byte_order_and_wide_unsigned_input():
    """Big-endian arrays are searched like native ones; uint64 beyond int64 becomes float."""
    bank = Bank(4)
    bank.add(XB)
    q = XB[:3] + 0.01
    np.testing.assert_array_equal(bank.nearest(q.astype(">f4"))[1], bank.nearest(q)[1])
    assert bank.nearest(np.full((1, 4), 2**63 + 2**62, np.uint64))[1].shape == (1,)
    with pytest.raises(InvalidIdError, match="2\\*\\*63"):
        bank.remove(np.array([2**63], np.uint64))
