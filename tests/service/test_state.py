"""Lost or stuck state: one writer per data dir, index builds against writes, failed builds,
writes that change nothing."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from vqsearch.index import ApproxIndex, FactoryStringError
from vqsearch.service._entry import DeletedBankError
from vqsearch.service._lock import DataDirLockedError
from vqsearch.service._registry import Registry

from .conftest import CODEBOOK, Server, app_client

BUSY = ("queued", "training", "saving")


def _registry(root: Path, **kw) -> Registry:
    reg = Registry(root, **kw)
    reg.load()
    return reg


def _idle(reg: Registry) -> None:
    """Every build queued has run (one build thread: a no-op queued last runs last; a build
    can queue another, so until a no-op finds none under way)."""
    for _ in range(100):
        reg.background(lambda: None).result(timeout=120)
        if all(e.build is None or e.build.state not in BUSY for e in reg.entries.values()):
            return
    raise AssertionError("builds did not settle")


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    """A second server on the same data dir refuses to start and names the first one's pid;
    a read-only replica starts beside it; once the first stops, the data dir is free."""
    first = Server(tmp_path / "d").start()
    try:
        with pytest.raises(
            RuntimeError, match=rf"in use by another vqsearch server \(pid {first.proc.pid}\)"
        ):  # type: ignore[union-attr]
            Server(tmp_path / "d").start()
        replica = Server(tmp_path / "d", VQSEARCH_READ_ONLY="1").start()
        replica.stop()
        r = httpx.post(f"{first.url}/v1/banks/b/vectors", json={"vectors": [[1.0, 2.0]]})
        assert r.status_code == 404  # the first server still serves
    finally:
        first.stop()
    second = Server(tmp_path / "d").start()  # the lock went with the process
    second.stop()


def test_the_lock_is_taken_in_process_too(tmp_path):
    """Two registries on one data dir in one process: the second is refused (flock is per open
    file); read-only ones take no lock; closing releases it."""
    a = _registry(tmp_path)
    with pytest.raises(DataDirLockedError, match="pid"):
        _registry(tmp_path)
    _registry(tmp_path, read_only=True).close()
    a.close()
    _registry(tmp_path).close()


def _bank(reg: Registry, n: int = 600, d: int = 8):
    xb = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    return reg.create("b", d, "l2", xb, None)


def _ready_at_current_version(entry) -> None:
    assert entry.build.state == "ready", entry.build
    assert entry.build.bank_version == entry.version
    assert entry.index is not None and entry.index.ntotal == entry.bank.ntotal


def test_a_write_during_a_build_ends_in_a_ready_index(tmp_path, monkeypatch):
    """The reported case: a write lands while the automatic rebuild trains. The build that read
    the old rows is superseded and a new one reads the new rows: ready at the current version,
    never stuck in 'saving'."""
    reg = _registry(tmp_path)
    entry = _bank(reg)
    reg.build_index(entry, "PQ4x4fs")
    _idle(reg)
    _ready_at_current_version(entry)
    real, writes = ApproxIndex.build, []

    def build_and_write(*args, **kw):
        out = real(*args, **kw)
        if not writes:  # once: a write between this build's read of the bank and its end
            writes.append(reg.remove(entry, [0, 1]))
        return out

    monkeypatch.setattr(ApproxIndex, "build", staticmethod(build_and_write))
    reg.add(entry, np.ones((3, 8), np.float32), None)
    _idle(reg)
    assert writes == [2]
    _ready_at_current_version(entry)
    assert entry.index.ntotal == 601
    reg.close()


@pytest.mark.parametrize("seed", range(4))
def test_any_interleaving_of_writes_and_builds_ends_ready(tmp_path, seed):
    """Random writes (adds, removes, empty ones) and builds of several specs, none waited for:
    once the queue drains, the index is ready at the bank's current version and holds exactly
    the bank's ids."""
    rnd = random.Random(seed)
    reg = _registry(tmp_path)
    entry = _bank(reg)
    specs = ["PQ4x4fs", "PQ8x4fs,RFlat", "IVF16,PQ4x4fs"]
    reg.build_index(entry, rnd.choice(specs))
    for _ in range(30):
        op = rnd.random()
        if op < 0.4:
            reg.add(
                entry, np.random.default_rng(rnd.randrange(99)).random((3, 8), np.float32), None
            )
        elif op < 0.7:
            reg.remove(entry, rnd.sample(list(entry.bank.ids()), rnd.choice([0, 1, 2])))
        else:
            reg.build_index(entry, rnd.choice(specs))
        if rnd.random() < 0.3:
            _idle(reg) if rnd.random() < 0.5 else None
    _idle(reg)
    _ready_at_current_version(entry)
    ids = np.sort(ApproxIndex.search(entry.index, entry.bank.vectors(), 1)[1][:, 0])
    assert set(ids) <= set(entry.bank.ids())
    reg.close()


def test_a_failed_build_keeps_the_working_spec_and_index(tmp_path, monkeypatch):
    """A build that fails after passing validation keeps the previous spec and index serving,
    says why; the next write rebuilds the working spec, not the failed one."""
    reg = _registry(tmp_path)
    entry = _bank(reg)
    reg.build_index(entry, "PQ4x4fs")
    _idle(reg)
    working = entry.index
    real = ApproxIndex.build

    def fail_one(xb, *args, **kw):
        if kw.get("spec") == "PQ8x4fs":
            raise FactoryStringError("simulated failure")
        return real(xb, *args, **kw)

    monkeypatch.setattr(ApproxIndex, "build", staticmethod(fail_one))
    reg.build_index(entry, "PQ8x4fs")
    _idle(reg)
    assert entry.index is working and entry.build.spec == "PQ4x4fs"
    assert entry.build.state == "ready" and "PQ8x4fs" in entry.build.error
    reg.add(entry, np.ones((1, 8), np.float32), None)
    _idle(reg)
    _ready_at_current_version(entry)
    assert entry.build.spec == "PQ4x4fs" and entry.build.error is None
    reg.close()


async def _wait_index(client: httpx.AsyncClient, name: str) -> dict:
    for _ in range(600):
        info = (await client.get(f"/v1/banks/{name}")).json()["index"]
        if info["state"] in ("ready", "failed"):
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(info)


async def test_specs_that_cannot_train_are_refused_up_front(api):
    """What can be known before training is a 422 naming it, and the working index stays."""
    assert (await api.put("/v1/banks/cb/index?spec=PQ8x4fs")).status_code == 202
    before = await _wait_index(api, "cb")
    for spec, words in [
        ("IVF65536,PQ8x4fs", "IVF65536 needs at least 65536 training vectors"),
        ("PQ5", "multiple of the number of subquantizers"),
        ("PQ8x20", "1 to 16"),
        ("PQ8x10", "1024 training vectors"),
    ]:
        r = await api.put(f"/v1/banks/cb/index?spec={spec}")
        assert r.status_code == 422 and words in r.json()["detail"], r.text
    r = await api.put("/v1/banks/cb/index?spec=IVF256,PQ8x4fs&train_size=100")
    assert r.status_code == 422 and "train_size=100" in r.json()["detail"]
    assert (await api.get("/v1/banks/cb")).json()["index"] == before


async def test_a_queued_build_reports_the_spec_it_will_build(api):
    r = await api.put("/v1/banks/cb/index")
    assert r.status_code == 202 and r.json()["spec"] == "PQ8x4fs"


async def test_the_write_during_rebuild_case_over_http(api):
    """Build, then add 3 and remove 2 at once: the index ends ready at the current version."""
    await api.put("/v1/banks/cb/index?spec=PQ8x4fs")
    await _wait_index(api, "cb")
    add = api.post("/v1/banks/cb/vectors", json={"vectors": CODEBOOK[:3].tolist()})
    rm = api.request("DELETE", "/v1/banks/cb/vectors", json={"ids": [5, 6]})
    assert [r.status_code for r in await asyncio.gather(add, rm)] == [200, 200]
    info = await _wait_index(api, "cb")
    bank = (await api.get("/v1/banks/cb")).json()
    assert info["state"] == "ready" and info["bank_version"] == bank["version"]
    assert info["ntotal"] == bank["count"] == 513
    r = await api.post("/v1/banks/cb/search?mode=approx", json={"queries": CODEBOOK[:2].tolist()})
    assert r.status_code == 200


async def test_writes_that_change_nothing_change_no_version(api):
    """An empty delete or append keeps the version: If-Match pins hold and the index stays."""
    await api.put("/v1/banks/cb/index?spec=PQ8x4fs")
    await _wait_index(api, "cb")
    before = (await api.get("/v1/banks/cb")).json()
    r = await api.request("DELETE", "/v1/banks/cb/vectors", json={"ids": []})
    assert r.status_code == 200 and r.json() == {"removed": 0}
    r = await api.post("/v1/banks/cb/vectors", json={"vectors": []})
    assert r.status_code == 200 and r.json()["ids"] == []
    after = (await api.get("/v1/banks/cb")).json()
    assert after["version"] == before["version"] and after["generation"] == before["generation"]
    assert after["index"] == before["index"]
    pinned = await api.post(
        "/v1/banks/cb/nearest",
        json={"queries": [[0.0] * 16]},
        headers={"If-Match": before["version"]},
    )
    assert pinned.status_code == 200


async def test_bank_list_is_in_name_order_across_restarts(settings):
    names = ["zeta", "alpha", "mid", "beta"]
    async with app_client(settings) as a:
        for n in names:
            assert (await a.put(f"/v1/banks/{n}?d=4")).status_code == 201
        assert [b["name"] for b in (await a.get("/v1/banks")).json()] == sorted(names)
    async with app_client(settings) as b:
        assert [b_["name"] for b_ in (await b.get("/v1/banks")).json()] == sorted(names)


def test_a_deleted_bank_is_dead_to_writers_that_resolved_it(tmp_path):
    """A writer holding the entry of a bank deleted (and created again) under it gets
    DeletedBankError for appends, removals, builds and files; the new bank is untouched and
    loads after a restart with what its own writes acknowledged."""
    reg = _registry(tmp_path)
    old = _bank(reg)
    reg.delete("b")
    new = _bank(reg, n=5)
    for write in (
        lambda: reg.add(old, np.ones((10, 8), np.float32), None),
        lambda: reg.remove(old, [0]),
        lambda: reg.build_index(old, "PQ4x4fs"),
        lambda: reg.write_file(old, "tradeoff.json", b"{}"),
    ):
        with pytest.raises(DeletedBankError):
            write()
    assert new.bank.ntotal == 5 and reg.get("b") is new
    version = new.version
    reg.close()
    again = _registry(tmp_path)
    assert again.get("b").version == version and again.get("b").bank.ntotal == 5
    again.close()


def test_compaction_runs_after_the_write_and_keeps_what_was_written_meanwhile(
    tmp_path, monkeypatch
):
    """The write that piles up segments is answered first; the compaction streams in the
    background; an append and a deletion that land while it runs are kept; a compaction
    changes no row, version, generation, nor the ready index."""
    from vqsearch.index import _compact

    reg = _registry(tmp_path)
    entry = _bank(reg, n=100)
    real, started, go = _compact.prepare, threading.Event(), threading.Event()

    def held_prepare(*args):
        plan = real(*args)
        started.set()
        assert go.wait(60)
        return plan

    monkeypatch.setattr(_compact, "prepare", held_prepare)
    rng = np.random.default_rng(5)
    for _ in range(16):  # 17 segments: over MAX_SEGMENTS
        reg.add(entry, rng.random((5, 8), np.float32), None)
    assert started.wait(60) and entry.bank.num_segments == 17  # answered, not compacted
    reg.add(entry, np.full((2, 8), 7.0, np.float32), [900, 901])
    reg.remove(entry, [3, 900])
    version, generation, vectors = entry.version, entry.bank.generation, entry.bank.vectors()
    go.set()
    reg.jobs.drain_compactions()
    # the first segment (larger than all after it) stays, the 16 small ones are folded into
    # one, and the append made meanwhile follows
    assert entry.bank.num_segments == 3
    assert (entry.version, entry.bank.generation) == (version, generation)
    np.testing.assert_array_equal(entry.bank.vectors(), vectors)
    assert entry.bank.ntotal == 100 + 80 + 2 - 2 and 901 in entry.bank.ids()
    assert 900 not in entry.bank.ids() and 3 not in entry.bank.ids()
    reg.build_index(entry, "PQ4x4fs")
    _idle(reg)
    index = entry.index
    reg.jobs.compact(entry)  # the last two into one: the index serves on
    assert entry.bank.num_segments == 2 and entry.index is index and entry.version == version
    reg.close()
    again = _registry(tmp_path)
    b = again.get("b")
    assert b.version == version and b.bank.num_segments == 2 and b.index is not None
    np.testing.assert_array_equal(b.bank.vectors(), vectors)
    assert not list((tmp_path / "banks" / "b").glob("compact-*"))
    again.close()


def test_a_sharded_bank_the_cluster_cannot_place_is_not_kept(tmp_path: Path):
    """Placing the shards fails (the cluster went away): the create is refused with that
    error, nothing of the bank stays on disk, and the same name can be created again."""
    from vqsearch.service import ShardsUnavailableError

    class Flaky:
        fail = True

        def __call__(self, path, n, metric):
            if self.fail:
                raise ShardsUnavailableError("no cluster")
            return Placed(n)

    class Placed:
        def __init__(self, n):
            self.n = n

        def close(self):
            pass

    placement = Flaky()
    reg = _registry(tmp_path / "data", placement=placement)
    with pytest.raises(ShardsUnavailableError, match="no cluster"):
        reg.create("s", 4, "l2", CODEBOOK[:10, :4].copy(), None, shards=2)
    assert "s" not in reg.entries
    assert not (tmp_path / "data" / "banks" / "s").exists()
    placement.fail = False
    entry = reg.create("s", 4, "l2", CODEBOOK[:10, :4].copy(), None, shards=2)
    assert entry.placed is not None and entry.bank.ntotal == 10
    assert [p.name for p in (tmp_path / "data" / "banks").iterdir()] == ["s"]
