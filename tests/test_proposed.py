"""`search_proposed`: a compressed index proposes candidates, the bank scores them in float64.
Every distance returned is the exact distance of its id (ties by id), deleted ids never come
back, and recall is at least that of the same index re-ranked by an `RFlat` copy."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import brute_force
from vqsearch.index import ApproxIndex, Bank, InvalidInputError, k_recall_at_k, search_proposed

D = 32


def clustered(rng: np.random.Generator, n: int) -> np.ndarray:
    """A trained codebook's shape: clusters far from the origin, every tenth row copied."""
    centres = rng.standard_normal((16, D)).astype(np.float32) * 3 + 10
    xb = centres[rng.integers(0, 16, n)] + rng.standard_normal((n, D)).astype(np.float32)
    xb[1::10] = xb[0::10]
    return xb


def pair_distances(xq: np.ndarray, xb: np.ndarray, I: np.ndarray, metric: str) -> np.ndarray:
    """float64 distance of each query to each returned row, as reported (numpy's formula)."""
    q, b = xq.astype(np.float64), xb[I].astype(np.float64)  # (nq, d), (nq, k, d)
    if metric == "l2":
        return ((b - q[:, None]) ** 2).sum(-1)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=2, keepdims=True)
    return (b * q[:, None]).sum(-1)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_distances_are_the_exact_distances_of_the_ids(tmp_path, rng, metric):
    xb = clustered(rng, 3000)
    bank = Bank.create(tmp_path / "b", D, metric)
    bank.add(xb)
    bank = Bank.open(tmp_path / "b")  # the rows memory-mapped, as a server holds them
    index = ApproxIndex.build(bank.vectors(), bank.ids(), metric, "IVF16,PQ16x4fs")
    xq = np.concatenate([xb[:40:2] + 0.01, xb[rng.integers(0, 3000, 40)] + 0.2])
    Dp, Ip = search_proposed(bank, index, xq, 10, k_factor=4, nprobe=4)
    assert Dp.shape == Ip.shape == (len(xq), 10) and (Ip >= 0).all()
    np.testing.assert_allclose(Dp, pair_distances(xq, xb, Ip, metric), rtol=1e-6, atol=1e-5)
    De, Ie = bank.search(xq, 10)
    same = Ip == Ie  # where the exact search put the same id at the same place
    assert same.any()
    np.testing.assert_array_equal(Dp[same], De[same])  # the same float64 formula, bit for bit
    nearer = np.diff(Dp, axis=1) >= 0 if metric == "l2" else np.diff(Dp, axis=1) <= 0
    assert nearer.all()
    if metric == "l2":  # twins (10j, 10j + 1) tie: the lower id first
        twin = (Ip[:, 1:] == Ip[:, :-1] + 1) & (Ip[:, :-1] % 10 == 0)
        assert twin.any() and (Dp[:, 1:][twin] == Dp[:, :-1][twin]).all()
        assert not ((Ip[:, 1:] == Ip[:, :-1] - 1) & (Ip[:, :-1] % 10 == 1)).any()


def test_deleted_ids_never_come_back(rng):
    xb = clustered(rng, 2000)
    bank = Bank(D)
    bank.add(xb)
    index = ApproxIndex.build(bank.vectors(), bank.ids(), "l2", "PQ16x4fs")
    gone = np.arange(0, 2000, 3)
    bank.remove(gone)
    xq = xb[:60]  # a third of them are deleted rows themselves
    _, I = search_proposed(bank, index, xq, 10, k_factor=3)
    assert not set(I.ravel().tolist()) & set(gone.tolist())
    live = np.setdiff1d(np.arange(2000), gone)
    _, Ie = brute_force(xq, xb[live], 1, "l2")
    assert (I[:, 0] == live[Ie[:, 0]]).mean() > 0.8

    small = Bank(D)
    small.add(xb[:20])
    index = ApproxIndex.build(small.vectors(), small.ids(), "l2", "PQ16x4fs")
    small.remove(np.arange(15))
    Dp, Ip = search_proposed(small, index, xb[:2], 10, k_factor=2)
    assert (np.sort(Ip[:, :5], 1) == np.arange(15, 20)).all()  # the 5 live rows, then nothing
    assert (Ip[:, 5:] == -1).all() and np.isinf(Dp[:, 5:]).all()


def test_recall_is_at_least_that_of_rflat_at_the_same_k_factor(rng):
    """The same IVF-PQ (same training seed: the same proposals), re-ranked by its own float32
    copy (`RFlat`) or by the bank in float64: the bank's recall is at least as high."""
    xb = clustered(rng, 5000)
    bank = Bank(D)
    bank.add(xb)
    xq = xb[rng.integers(0, 5000, 200)] + 0.3 * rng.standard_normal((200, D)).astype(np.float32)
    _, gt = bank.search(xq, 10)
    codes = ApproxIndex.build(bank.vectors(), bank.ids(), "l2", "IVF32,PQ16x4fs")
    refined = ApproxIndex.build(bank.vectors(), bank.ids(), "l2", "IVF32,PQ16x4fs,RFlat")
    got = []
    for k_factor in (1, 2, 8):
        _, Ip = search_proposed(bank, codes, xq, 10, k_factor=k_factor, nprobe=8)
        _, Ir = refined.search(xq, 10, nprobe=8, k_factor=k_factor)
        rp, rr = k_recall_at_k(gt, Ip), k_recall_at_k(gt, Ir)
        assert rp >= rr - 1e-9, (k_factor, rp, rr)
        got.append(rp)
    assert got == sorted(got) and got[-1] > got[0] + 0.2  # a longer shortlist buys recall


def test_bad_k_factor_is_named(rng):
    bank = Bank(D)
    bank.add(clustered(rng, 300))
    index = ApproxIndex.build(bank.vectors(), bank.ids(), "l2", "PQ16x4fs")
    for bad in (0.5, 2000, True, "4"):
        with pytest.raises(InvalidInputError, match="k_factor"):
            search_proposed(bank, index, bank.vectors()[:2], 3, k_factor=bad)  # type: ignore[arg-type]
