"""Sharded banks on a real 3-node Ray cluster: shard actors (`RayShards`) answer exactly what
the bank answers whole (float64 brute force, ties across shards by lowest id), at the version
the writer acknowledged last; a write lands on the shard id % n."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import brute_force
from vqsearch.index import Bank, CorruptBankError, Queries, StorageError
from vqsearch.ray import RayShards
from vqsearch.ray._shard import BankShard
from vqsearch.service import ShardsUnavailableError

D = 24


def clustered(rng: np.random.Generator, n: int) -> np.ndarray:
    """A trained codebook's shape: clusters far from the origin, every tenth row a copy of
    the row before it (the copy's id lands on the other shard of two: a tie across shards)."""
    centres = rng.standard_normal((8, D)).astype(np.float32) * 4 + 30
    xb = centres[rng.integers(0, 8, n)] + rng.standard_normal((n, D)).astype(np.float32)
    xb[1::10] = xb[0::10]
    return xb


def queries(rng: np.random.Generator, xb: np.ndarray) -> np.ndarray:
    near = xb[rng.integers(0, len(xb), 40)] + 0.01
    return np.concatenate([xb[:20:2], near, rng.standard_normal((20, D)).astype(np.float32) + 30])


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_sharded_equals_the_bank_and_brute_force(cluster, tmp_path: Path, metric, rng):
    xb = clustered(rng, 900)
    bank = Bank.create(tmp_path / "b", D, metric)
    bank.add(xb)
    shards = RayShards(tmp_path / "b", 2, metric, timeout=60)
    try:
        nodes = {node for node, _ in shards.where()}
        assert len(nodes) == 2  # one CPU per node: the two shards run on two nodes
        xq = queries(rng, xb)
        for k in (1, 5):
            Ds, Is = shards.search(Queries.of(xq, D, metric), k, lambda: bank.version)
            Dw, Iw = bank.search(xq, k)
            np.testing.assert_array_equal(Is, Iw)
            np.testing.assert_array_equal(Ds, Dw)
            Db, Ib = brute_force(xq, xb, k, metric)
            np.testing.assert_array_equal(Is, Ib)  # ids are rows: added as 0..n-1
            np.testing.assert_allclose(Ds, Db, rtol=1e-6, atol=1e-3)
        # the exact ties: a query on row 0 finds rows 0 and 1 (shards 0 and 1), in id order
        _, I2 = shards.search(Queries.of(xb[:1], D, metric), 2, lambda: bank.version)
        if metric == "l2":
            assert I2.tolist() == [[0, 1]]
    finally:
        shards.close()


def test_writes_land_on_their_shard_and_answers_follow_them(cluster, tmp_path: Path, rng):
    xb = clustered(rng, 300)
    bank = Bank.create(tmp_path / "b", D, "l2")
    bank.add(xb)
    shards = RayShards(tmp_path / "b", 2, "l2", timeout=60)
    try:
        new = clustered(rng, 50)
        bank.add(new, np.arange(1000, 1050))
        bank.remove(np.arange(0, 300, 7))
        live = np.sort(bank.ids())
        xq = np.concatenate([new[:10], xb[:10]])
        Ds, Is = shards.search(Queries.of(xq, D, "l2"), 3, lambda: bank.version)  # reloads at it
        held = shards.ids()
        for s, ids in enumerate(held):
            assert np.all(ids % 2 == s)
        np.testing.assert_array_equal(np.sort(np.concatenate(held)), live)
        Dw, Iw = bank.search(xq, 3)
        np.testing.assert_array_equal(Is, Iw)
        np.testing.assert_array_equal(Ds, Dw)
        assert not np.isin(Is, np.arange(0, 300, 7)).any()  # removed rows are gone

        # a search asked at the version before a write reaches shards that have read the
        # directory since: they answer at the newer version, which the server then reports
        before = bank.version
        bank.add(xq[:3] + 0.001, np.arange(2000, 2003))
        shards.search(Queries.of(xq[:1], D, "l2"), 1, lambda: bank.version)  # now at the new
        asked = iter([before])
        Ds, Is = shards.search(Queries.of(xq, D, "l2"), 3, lambda: next(asked, bank.version))
        Dw, Iw = bank.search(xq, 3)
        np.testing.assert_array_equal(Is, Iw)
        assert {2000, 2002} <= set(Is.ravel().tolist())  # the write is in the answer
    finally:
        shards.close()


def test_a_version_no_shard_can_reach_is_refused_not_answered(cluster, tmp_path: Path, rng):
    """Asked for a version the directory never had, the shards answer at theirs and the
    search is refused (a 503 in the service), never answered from the wrong rows."""
    bank = Bank.create(tmp_path / "b", D, "l2")
    bank.add(clustered(rng, 100))
    shards = RayShards(tmp_path / "b", 2, "l2", timeout=60)
    try:
        with pytest.raises(ShardsUnavailableError, match="versions"):
            shards.search(Queries.of(np.zeros((1, D), np.float32), D, "l2"), 1, lambda: "v-never")
    finally:
        shards.close()


def test_a_starting_shard_reads_the_directory_again_when_a_compaction_races_it(
    tmp_path: Path, monkeypatch
):
    """A shard (re)started while the server writes may meet a file a compaction just removed:
    its first read is tried again instead of ending the actor (which Ray would not restart)."""
    bank = Bank.create(tmp_path / "b", D)
    bank.add(np.ones((6, D), np.float32))
    real, calls = BankShard._load, []

    def flaky(self, verify=False, reuse=None):
        calls.append(verify)
        if len(calls) < 3:
            raise CorruptBankError("seg-00000001.vectors.npy: missing data file")
        return real(self, verify, reuse)

    monkeypatch.setattr(BankShard, "_load", flaky)
    shard = BankShard(str(tmp_path / "b"), 0, 2)
    assert calls == [True, True, True] and shard.ids().tolist() == [0, 2, 4]
    shard.close()
    # a shard whose bank is gone (deleted before the actor started) leaves no copies behind
    monkeypatch.setattr(BankShard, "_load", real)
    (tmp_path / "b").rename(tmp_path / "gone")
    with pytest.raises(StorageError, match="no bank here"):
        BankShard(str(tmp_path / "b"), 1, 2)
    assert not shard.spill.with_name(shard.spill.name.replace("-0-2", "-1-2")).exists()


def test_a_shard_maps_its_rows_from_copies_of_its_own_and_removes_them(tmp_path: Path, rng):
    """A shard's rows are files in a directory of its own, mapped: kept across reloads for
    the segments that stay, removed for the ones a compaction replaced, and all removed by
    `close`."""
    bank = Bank.create(tmp_path / "b", D, auto_compact=False)
    for _ in range(3):
        bank.add(clustered(rng, 100))
    shard = BankShard(str(tmp_path / "b"), 1, 2)
    first = {f: f.stat().st_ino for f in shard.spill.iterdir()}
    assert len(first) == 3 and shard.bank.mapped_files() == set(first)
    bank.add(clustered(rng, 100))
    shard.search64(clustered(rng, 2), 3, bank.version)  # a new version: read again
    now = {f: f.stat().st_ino for f in shard.spill.iterdir()}
    assert len(now) == 4 and all(now[f] == ino for f, ino in first.items())  # not rewritten
    bank.compact()  # the same content, so the same version: then one more row
    bank.add(clustered(rng, 2))
    _, _, v = shard.search64(clustered(rng, 2), 3, bank.version)
    files = set(shard.spill.iterdir())
    assert v == bank.version and files == shard.bank.mapped_files()
    assert not files & set(now) and len(files) == 2  # the compacted segment, the new one
    np.testing.assert_array_equal(np.sort(shard.ids()), np.sort(bank.ids()[bank.ids() % 2 == 1]))
    shard.close()
    assert not shard.spill.exists()
