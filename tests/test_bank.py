"""Banks: ids, add/remove/get, exact search through segments, and durable storage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import brute_force
from vqsearch.index import (
    Bank,
    CorruptBankError,
    DuplicateIdError,
    EmptyBankError,
    InvalidIdError,
    StorageError,
    UnknownIdError,
    ZeroVectorError,
)
from vqsearch.index._bank import MAX_SEGMENTS


def _vecs(rng, n, d=16):
    return rng.standard_normal((n, d)).astype(np.float32)


def test_default_ids_and_search_through_segments_and_tombstones(rng):
    """Search over several segments with deleted rows equals brute force over the live rows."""
    bank = Bank(16, "l2")
    parts = [_vecs(rng, n) for n in (300, 200, 500)]
    for p in parts:
        bank.add(p)
    np.testing.assert_array_equal(bank.ids(), np.arange(1000))
    gone = rng.choice(1000, 100, replace=False)
    assert bank.remove(gone) == 100
    live = np.setdiff1d(np.arange(1000), gone)
    xb = np.concatenate(parts)[live]
    xq = _vecs(rng, 60)
    for k in (1, 6):
        D, I = bank.search(xq, k)
        Dr, Ir = brute_force(xq, xb, k, "l2")
        np.testing.assert_array_equal(I, live[Ir])
        np.testing.assert_allclose(D, Dr, rtol=1e-6)


def test_user_ids_ties_break_by_lowest_id_not_row(rng):
    """With user ids, exact duplicates resolve to the lowest id even when it is stored later."""
    v = _vecs(rng, 10)
    bank = Bank(16)
    bank.add(v, ids=np.arange(10) + 100)
    bank.add(v, ids=np.arange(10) + 5)  # same vectors, lower ids, later rows
    _, I = bank.search(v, 2)
    np.testing.assert_array_equal(I[:, 0], np.arange(10) + 5)
    np.testing.assert_array_equal(I[:, 1], np.arange(10) + 100)


def test_get_returns_vectors_by_id_in_any_shape(rng):
    """get() decodes ids of any shape back to their vectors; unknown ids are refused."""
    v = _vecs(rng, 50)
    bank = Bank(16)
    bank.add(v, ids=np.arange(50) * 3)
    codes = np.array([[3, 0], [147, 6]])
    np.testing.assert_array_equal(bank.get(codes), v[codes // 3])
    with pytest.raises(UnknownIdError, match="1"):
        bank.get([1])


def test_id_rules(rng):
    """Duplicate (batch or bank) and negative ids are refused; removed ids may come back."""
    bank = Bank(16)
    bank.add(_vecs(rng, 5), ids=[1, 2, 3, 4, 5])
    with pytest.raises(DuplicateIdError, match="3"):
        bank.add(_vecs(rng, 2), ids=[3, 9])
    with pytest.raises(DuplicateIdError, match="repeated"):
        bank.add(_vecs(rng, 2), ids=[7, 7])
    with pytest.raises(InvalidIdError, match=">= 0"):
        bank.add(_vecs(rng, 1), ids=[-1])
    with pytest.raises(UnknownIdError):
        bank.remove([5, 6])
    assert bank.ntotal == 5  # the failed remove removed nothing
    bank.remove([3])
    bank.add(_vecs(rng, 1), ids=[3])
    assert sorted(bank.ids().tolist()) == [1, 2, 3, 4, 5]
    assert bank.add(_vecs(rng, 2)).tolist() == [6, 7]


def test_cosine_bank_normalises_and_refuses_zero(rng):
    """Cosine banks store unit vectors, report similarities, and refuse zero vectors."""
    bank = Bank(16, "cosine")
    v = _vecs(rng, 100) * 7
    bank.add(v)
    np.testing.assert_allclose(np.linalg.norm(bank.vectors(), axis=1), 1, rtol=1e-6)
    D, I = bank.search(v[:10], 1)
    np.testing.assert_array_equal(I[:, 0], np.arange(10))
    np.testing.assert_allclose(D[:, 0], 1, rtol=1e-6)
    with pytest.raises(ZeroVectorError):
        bank.add(np.zeros((1, 16), np.float32))
    with pytest.raises(ZeroVectorError):
        bank.search(np.zeros((1, 16), np.float32), 1)


def test_empty_bank_search_refused():
    """Searching an empty bank is an EmptyBankError."""
    with pytest.raises(EmptyBankError):
        Bank(4).search(np.zeros((1, 4), np.float32), 1)


def test_persistence_round_trip(tmp_path, rng):
    """Appends, deletions and ids survive close and re-open; vectors come back memory-mapped."""
    bank = Bank.create(tmp_path / "b", 16, "ip")
    v1, v2 = _vecs(rng, 300), _vecs(rng, 100)
    bank.add(v1)
    bank.add(v2, ids=np.arange(100) + 1000)
    bank.remove([0, 1000])
    again = Bank.open(tmp_path / "b")
    assert (again.metric, again.d, again.ntotal) == ("ip", 16, 398)
    assert again.version == bank.version and again.generation == bank.generation
    np.testing.assert_array_equal(again.ids(), bank.ids())
    np.testing.assert_array_equal(again.vectors(), bank.vectors())
    assert isinstance(again._state.segments[0].vectors, np.memmap)
    xq = _vecs(rng, 20)
    for a, b in zip(again.search(xq, 4), bank.search(xq, 4), strict=True):
        np.testing.assert_array_equal(a, b)


def test_save_writes_the_live_rows_as_one_segment(tmp_path, rng):
    """save streams the live rows (deleted ones dropped, ids kept) into a new directory."""
    bank = Bank.create(tmp_path / "a", 16, auto_compact=False)
    for _ in range(3):
        bank.add(_vecs(rng, 500))
    bank.remove(np.arange(0, 1500, 3))
    copy = bank.save(tmp_path / "b")
    again = Bank.open(tmp_path / "b")
    assert again.num_segments == 1 and again.ntotal == 1000
    np.testing.assert_array_equal(again.ids(), bank.ids())
    np.testing.assert_array_equal(again.vectors(), bank.vectors())
    xq = _vecs(rng, 7)
    for a, b in zip(copy.search(xq, 5), bank.search(xq, 5), strict=True):
        np.testing.assert_array_equal(a, b)


def test_append_writes_only_a_new_segment(tmp_path, rng):
    """An append leaves existing segment files untouched (same inode and mtime)."""
    bank = Bank.create(tmp_path / "b", 16)
    bank.add(_vecs(rng, 1000))
    first = tmp_path / "b" / "seg-00000000.vectors.npy"
    before = first.stat()
    bank.add(_vecs(rng, 10))
    after = first.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert bank.num_segments == 2


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_bank_keeps_its_rows_when_the_caller_reuses_its_array(tmp_path, rng, on_disk):
    """`add` takes the rows, not the caller's buffer: overwriting the array after the call
    (a loader reusing one batch buffer) changes nothing in the bank."""
    bank = Bank.create(tmp_path / "b", 16) if on_disk else Bank(16)
    x = _vecs(rng, 100)
    kept = x.copy()
    bank.add(x)
    x[:] = 0.0
    np.testing.assert_array_equal(bank.get(np.arange(100)), kept)


# what both probes below start with: the anonymous memory of their own process
_ANON_MIB = """
import numpy as np, sys
from vqsearch.index import Bank

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
"""

_ANON_PROBE = (
    _ANON_MIB
    + """
bank = Bank.create(sys.argv[1], 64, auto_compact=False)
rng = np.random.default_rng(0)
x = rng.standard_normal((65536, 64), dtype=np.float32)  # 16 MiB a batch
bank.add(x)
before = anon_mib()
for _ in range(8):
    x = rng.standard_normal((65536, 64), dtype=np.float32)
    bank.add(x)
del x
print(anon_mib() - before, all(isinstance(s.vectors, np.memmap) for s in bank._state.segments))
"""
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
def test_appended_rows_are_read_from_their_file_not_held_in_anonymous_memory(tmp_path):
    """After an append is durable its rows are served from the segment file (page cache, which
    the kernel can evict), so a bank growing by appends does not grow the process's anonymous
    memory by its size: 128 MiB appended here, against the 16 MiB a batch needs in flight."""
    out = subprocess.run(
        [sys.executable, "-c", _ANON_PROBE, str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    growth, mapped = float(out[0]), out[1] == "True"
    assert mapped
    assert growth < 48, f"anonymous memory grew {growth:.0f} MiB over 128 MiB of appends"


_SPILL_PROBE = (
    _ANON_MIB
    + """
from pathlib import Path

bank = Bank.create(sys.argv[1], 64, auto_compact=False)
rng = np.random.default_rng(0)
for _ in range(4):
    bank.add(rng.standard_normal((131072, 64), dtype=np.float32))  # 32 MiB a segment
spill = Path(sys.argv[2])
before = anon_mib()
shard = bank.shard(0, 2, spill=spill)
held = anon_mib() - before
shard.search64(np.zeros((1, 64), np.float32), 1)  # a search touches every row
files = shard.mapped_files()
print(held, len(files), all(f.parent == spill for f in files))
"""
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
def test_a_spilled_shard_maps_its_rows_from_files_of_its_own(tmp_path):
    """`Bank.shard(spill=DIR)` writes the shard's rows (64 MiB here: half of 4 segments)
    to one file a segment in DIR and maps them: the process's anonymous memory does not
    grow by their size."""
    out = subprocess.run(
        [sys.executable, "-c", _SPILL_PROBE, str(tmp_path / "b"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    held, files, inside = float(out[0]), int(out[1]), out[2] == "True"
    assert files == 4 and inside
    assert held < 24, f"anonymous memory grew {held:.0f} MiB for a 64 MiB shard"


def test_a_spilled_shard_answers_as_one_in_memory(tmp_path, rng):
    bank = Bank.create(tmp_path / "b", 16, auto_compact=False)
    for _ in range(3):
        bank.add(_vecs(rng, 300))
    bank.remove(np.arange(0, 900, 7))
    (tmp_path / "spill").mkdir()
    xq = _vecs(rng, 20)
    for s in range(3):
        kept = bank.shard(s, 3)
        spilled = bank.shard(s, 3, spill=tmp_path / "spill")
        assert not kept.mapped_files() and len(spilled.mapped_files()) == 3
        np.testing.assert_array_equal(spilled.ids(), kept.ids())
        for a, b in zip(spilled.search64(xq, 5), kept.search64(xq, 5), strict=True):
            np.testing.assert_array_equal(a, b)


def test_compaction_folds_segments_and_keeps_content(tmp_path, rng):
    """Many small appends and deletions trigger compaction; content and search stay the same."""
    bank = Bank.create(tmp_path / "b", 16)
    for _ in range(20):
        bank.add(_vecs(rng, 10))
    assert bank.num_segments <= 16
    bank.remove(np.arange(0, 200, 2))  # half dead: over the tombstone threshold
    assert bank.num_segments == 1 and bank.ntotal == 100
    np.testing.assert_array_equal(bank.ids(), np.arange(1, 200, 2))
    files = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert files == [
        "manifest.json",
        f"{bank._state.segments[0].name}.ids.npy",
        f"{bank._state.segments[0].name}.vectors.npy",
    ]
    again = Bank.open(tmp_path / "b")
    np.testing.assert_array_equal(again.vectors(), bank.vectors())


def test_corrupted_or_truncated_files_are_refused(tmp_path, rng):
    """A flipped byte, a truncated file, or an edited manifest raises CorruptBankError."""
    bank = Bank.create(tmp_path / "b", 16)
    bank.add(_vecs(rng, 200))
    vec = tmp_path / "b" / "seg-00000000.vectors.npy"
    good = vec.read_bytes()
    vec.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CorruptBankError, match="checksum"):
        Bank.open(tmp_path / "b")
    vec.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptBankError):
        Bank.open(tmp_path / "b")
    vec.write_bytes(good)
    Bank.open(tmp_path / "b")
    man = tmp_path / "b" / "manifest.json"
    doc = json.loads(man.read_text())
    doc["d"] = 8
    man.write_text(json.dumps(doc))
    with pytest.raises(CorruptBankError, match="manifest"):
        Bank.open(tmp_path / "b")


def test_leftovers_of_an_interrupted_write_are_ignored_and_removed(tmp_path, rng):
    """Files a crashed append left behind (tmp or an unreferenced segment) never get loaded."""
    bank = Bank.create(tmp_path / "b", 16)
    bank.add(_vecs(rng, 50))
    d = tmp_path / "b"
    np.save(d / "seg-00000007.vectors.npy", _vecs(rng, 3))
    (d / ".manifest.json.abc.tmp").write_bytes(b"{half")
    again = Bank.open(d)
    assert again.ntotal == 50
    assert (
        not (d / "seg-00000007.vectors.npy").exists()
        and not (d / ".manifest.json.abc.tmp").exists()
    )


def test_create_twice_and_open_missing(tmp_path):
    """Creating over an existing bank, or opening a directory without one, is a StorageError."""
    Bank.create(tmp_path / "b", 4)
    with pytest.raises(StorageError, match="exists"):
        Bank.create(tmp_path / "b", 4)
    with pytest.raises(StorageError, match="manifest"):
        Bank.open(tmp_path / "nothing")


def test_version_tracks_content(rng):
    """Equal content gives equal versions; every write changes version and generation."""
    v = _vecs(rng, 20)
    a, b = Bank(16), Bank(16)
    a.add(v)
    b.add(v)
    assert a.version == b.version
    g, ver = a.generation, a.version
    a.remove([0])
    assert a.generation == g + 1 and a.version != ver


def test_streamed_compaction_keeps_writes_made_while_it_ran(tmp_path, rng):
    """prepare (part files), then an append and a deletion, then finish: the live rows are
    those of the bank after the writes, version and generation are the writes' own, and a
    reopened bank agrees; part files left by a compaction that never finished are removed."""
    bank = Bank.create(tmp_path / "b", 16, auto_compact=False)
    for _ in range(20):
        bank.add(_vecs(rng, 10))
    bank.remove([0, 1, 2])
    plan = bank.prepare_compaction()
    assert plan is not None and all(p.exists() for p in plan.parts.values())
    bank.add(_vecs(rng, 4), ids=[500, 501, 502, 503])
    bank.remove([5, 501])
    expect = (bank.ids().copy(), bank.vectors(), bank.version, bank.generation)
    assert bank.finish_compaction(plan)
    assert bank.num_segments == 2 and not any(p.exists() for p in plan.parts.values())
    np.testing.assert_array_equal(bank.ids(), expect[0])
    np.testing.assert_array_equal(bank.vectors(), expect[1])
    assert (bank.version, bank.generation) == expect[2:]
    again = Bank.open(tmp_path / "b")
    np.testing.assert_array_equal(again.vectors(), expect[1])
    assert again.version == expect[2]
    left = again.prepare_compaction()
    assert left is not None
    del again
    reopened = Bank.open(tmp_path / "b")  # the unfinished compaction's parts are leftovers
    assert not list((tmp_path / "b").glob("compact-*")) and reopened.ntotal == len(expect[0])


def test_automatic_compaction_folds_the_newest_segments_and_leaves_large_ones(tmp_path, rng):
    """Appends trigger folds of the small segments at the end only: a large segment written
    first is never rewritten by them (same file), the segment count stays bounded, and the
    rows, their order and the answers stay those of the appends."""
    bank = Bank.create(tmp_path / "b", 16)
    rows = [_vecs(rng, 3000)]
    bank.add(rows[0])
    big = (tmp_path / "b" / "seg-00000000.vectors.npy").stat().st_ino
    for _ in range(60):
        rows.append(_vecs(rng, 10))
        bank.add(rows[-1])
        assert bank.num_segments <= MAX_SEGMENTS
    assert bank._state.segments[0].name == "seg-00000000"
    assert (tmp_path / "b" / "seg-00000000.vectors.npy").stat().st_ino == big
    x = np.concatenate(rows)
    np.testing.assert_array_equal(bank.vectors(), x)
    np.testing.assert_array_equal(bank.ids(), np.arange(len(x)))
    xq = _vecs(rng, 5)
    np.testing.assert_array_equal(bank.search(xq, 4)[1], brute_force(xq, x, 4, "l2")[1])
    again = Bank.open(tmp_path / "b")
    np.testing.assert_array_equal(again.vectors(), x)


def test_a_partial_fold_keeps_writes_made_while_it_ran_and_the_prefix_tombstones(tmp_path, rng):
    """A fold of the last segments, prepared, then deletions in the segment it leaves and in
    those it folds and an append, then finished: the live rows are the bank's after the
    writes, the prefix keeps its own segment (and tombstones), and a reopened bank agrees.
    With a quarter of the rows dead, the fold is full: every tombstone goes."""
    bank = Bank.create(tmp_path / "b", 16, auto_compact=False)
    bank.add(_vecs(rng, 400))
    for _ in range(17):
        bank.add(_vecs(rng, 5))
    bank.remove([3, 402])
    plan = bank.prepare_compaction()
    assert plan is not None and plan.first == 1
    bank.remove([7, 410])
    bank.add(_vecs(rng, 2), ids=[900, 901])
    expect = (bank.ids().copy(), bank.vectors(), bank.version, bank.generation)
    assert bank.finish_compaction(plan)
    assert bank.num_segments == 3 and bank._state.segments[0].name == "seg-00000000"
    # ids 3 and 7 in the first segment; 410, deleted after the snapshot, in the folded one
    assert bank._state.dead.sum() == 3
    np.testing.assert_array_equal(bank.ids(), expect[0])
    np.testing.assert_array_equal(bank.vectors(), expect[1])
    assert (bank.version, bank.generation) == expect[2:]
    again = Bank.open(tmp_path / "b")
    np.testing.assert_array_equal(again.vectors(), expect[1])
    bank.remove(np.arange(100, 250))
    full = bank.prepare_compaction()
    assert full is not None and full.first == 0
    assert bank.finish_compaction(full)
    assert bank.num_segments == 1 and not bank._state.dead.any()
