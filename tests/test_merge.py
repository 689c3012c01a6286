"""Shards of a bank (`Bank.shard`) answer in float64 (`Bank.search64`); their answers merged
(`merge_shards`) are the whole bank's, ties across shards included."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import brute_force
from vqsearch.index import Bank, Queries, merge_shards


def _bank(metric: str, rng: np.random.Generator) -> tuple[Bank, np.ndarray]:
    """Clustered rows far from the origin (a trained codebook's), every tenth row duplicated
    under an id that lands on another shard (ties across shards)."""
    centres = rng.standard_normal((8, 24)).astype(np.float32) * 4 + 30
    xb = centres[rng.integers(0, 8, 600)] + rng.standard_normal((600, 24)).astype(np.float32)
    xb[1::10] = xb[0::10]
    bank = Bank(24, metric)
    bank.add(xb)
    return bank, xb


def _sharded(bank: Bank, xq: np.ndarray, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return merge_shards([bank.shard(s, n).search64(xq, k) for s in range(n)], k, bank.metric)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("k", [1, 7])
def test_merged_shards_equal_the_bank_and_brute_force(metric, k, rng):
    bank, xb = _bank(metric, rng)
    xq = np.concatenate([xb[:20] + 0.01, rng.standard_normal((30, 24)).astype(np.float32) + 30])
    D, I = bank.search(xq, k)
    for n in (1, 2, 3):
        Ds, Is = _sharded(bank, xq, k, n)
        np.testing.assert_array_equal(Is, I)
        np.testing.assert_array_equal(Ds, D)  # the same float64 value, reported the same way
    Db, Ib = brute_force(xq, bank.vectors(), k, metric)
    np.testing.assert_array_equal(I, Ib)  # ids are rows here: added 0..n-1
    np.testing.assert_allclose(D, Db, rtol=1e-6, atol=1e-4)
    if k > 1:  # twins (ids 10j, 10j + 1: on different shards) tie, the lower id first
        twin = (I[:, :-1] % 10 == 0) & (I[:, 1:] == I[:, :-1] + 1) & (D[:, :-1] == D[:, 1:])
        assert twin.any()
        assert not ((I[:, :-1] % 10 == 1) & (I[:, 1:] == I[:, :-1] - 1)).any()


def test_shards_partition_the_live_rows_by_id_after_writes(rng):
    bank, xb = _bank("l2", rng)
    bank.remove(np.arange(0, 600, 7))
    added = bank.add(xb[:50], ids=np.arange(10_000, 10_050))
    n = 3
    shards = [bank.shard(s, n) for s in range(n)]
    held = np.concatenate([sh.ids() for sh in shards])
    np.testing.assert_array_equal(np.sort(held), np.sort(bank.ids()))
    for s, sh in enumerate(shards):
        assert (sh.ids() % n == s).all()
        np.testing.assert_array_equal(sh.get(sh.ids()), bank.get(sh.ids()))
        assert sh.version == bank.version
    assert set(added.tolist()) <= set(held.tolist())


def test_a_shard_read_again_after_writes_copies_only_new_segments(tmp_path, rng):
    """`shard(reuse=)`: the same rows and answers as a shard made afresh, the segments it
    already held shared, not copied again; deletes seen in rows it reused."""
    xb = _bank("l2", rng)[1]
    bank = Bank.create(tmp_path / "b", 24, "l2")
    bank.add(xb[:300])
    first = Bank.open(tmp_path / "b", writable=False).shard(1, 2)
    bank.add(xb[300:], ids=np.arange(1000, 1300))
    bank.remove(np.arange(1, 300, 4))  # rows of the first segment, some on shard 1
    again = Bank.open(tmp_path / "b", writable=False)
    reread, fresh = again.shard(1, 2, reuse=first), again.shard(1, 2)
    old, new = first._state.segments[0], reread._state.segments[0]
    assert new is old and np.shares_memory(new.vectors, old.vectors)
    assert not np.shares_memory(reread._state.segments[1].vectors, again._state.segments[1].vectors)
    np.testing.assert_array_equal(np.sort(reread.ids()), np.sort(fresh.ids()))
    assert not set(range(1, 300, 4)) & set(reread.ids().tolist())
    xq = xb[::7] + 0.01
    for k in (1, 5):
        np.testing.assert_array_equal(reread.search64(xq, k)[1], fresh.search64(xq, k)[1])
        np.testing.assert_array_equal(reread.search64(xq, k)[0], fresh.search64(xq, k)[0])
    assert reread.version == fresh.version == again.version


def test_a_shard_smaller_than_k_answers_what_it_holds(rng):
    bank = Bank(4)
    bank.add(rng.standard_normal((5, 4)).astype(np.float32), ids=np.array([0, 3, 6, 1, 9]))
    xq = rng.standard_normal((3, 4)).astype(np.float32)
    parts = [bank.shard(s, 3).search64(xq, 4) for s in range(3)]
    assert [p[1].shape[1] for p in parts] == [4, 1, 0]  # ids 0,3,6,9 | 1 | none
    D, I = merge_shards(parts, 4, "l2")
    np.testing.assert_array_equal(I, bank.search(xq, 4)[1])
    np.testing.assert_array_equal(D, bank.search(xq, 4)[0])
    with pytest.raises(ValueError, match="candidates"):
        merge_shards(parts, 6, "l2")
    with pytest.raises(Exception, match="shard"):
        bank.shard(3, 3)


def test_validated_queries_travel_to_another_process_as_validated(rng):
    """Queries pickled (as Ray sends them to a shard) keep their Metric instance: the shard's
    bank takes them as validated."""
    import pickle

    bank, xb = _bank("cosine", rng)
    xq = Queries.of(xb[:3], 24, "cosine")
    back = pickle.loads(pickle.dumps(xq))
    assert back.metric is xq.metric
    np.testing.assert_array_equal(bank.search64(back, 2)[1], bank.search64(xq, 2)[1])
