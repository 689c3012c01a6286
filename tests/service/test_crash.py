"""Crash safety with a real server process: kill -9 mid-append and mid-build, a full disk."""

from __future__ import annotations

import io
import threading
import time

import httpx
import numpy as np

from tests.service.conftest import Server

D, BATCH = 16, 200
NPY = {"content-type": "application/x-npy"}


def _batch(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((BATCH, D)).astype(np.float32)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _decode(url: str, ids: np.ndarray) -> httpx.Response:
    return httpx.post(f"{url}/v1/banks/b/decode", content=_npy(ids), headers=NPY, timeout=60)


def test_kill9_while_appending_loses_no_acknowledged_write(tmp_path):
    """Appends race a kill -9; after restart every acknowledged batch is there, intact, and at
    most the one unacknowledged batch in flight landed, whole."""
    srv = Server(tmp_path / "d").start()
    httpx.put(f"{srv.url}/v1/banks/b", json={"d": D}, timeout=30).raise_for_status()
    acked: list[int] = []

    def append() -> None:
        with httpx.Client(timeout=10) as c:
            for i in range(100_000):
                ids = np.arange(i * BATCH, (i + 1) * BATCH)
                buf = io.BytesIO()
                np.savez(buf, vectors=_batch(i), ids=ids)
                try:
                    r = c.post(
                        f"{srv.url}/v1/banks/b/vectors",
                        content=buf.getvalue(),
                        headers={"content-type": "application/x-npz"},
                    )
                except httpx.TransportError:
                    return
                if r.status_code != 200:
                    return
                acked.append(i)

    t = threading.Thread(target=append)
    t.start()
    time.sleep(2.0)
    srv.stop(kill=True)
    t.join(30)
    assert len(acked) > 20  # enough appends (and compactions) happened before the kill
    srv.start()
    try:
        count = httpx.get(f"{srv.url}/v1/banks/b", timeout=30).json()["count"]
        assert count in (len(acked) * BATCH, (len(acked) + 1) * BATCH)
        for i in range(count // BATCH):
            r = _decode(srv.url, np.arange(i * BATCH, (i + 1) * BATCH))
            assert r.status_code == 200, (i, r.text)
            np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), _batch(i))
        beyond = _decode(srv.url, np.array([count]))
        assert beyond.status_code == 422  # nothing past the last whole batch
    finally:
        srv.stop()


def test_kill9_while_building_an_index_leaves_the_bank_whole(tmp_path):
    """A kill -9 during index training: the bank reloads intact, the index is never
    half-loaded, the unfinished build is reported and not retried at start, and a new build
    succeeds."""
    srv = Server(tmp_path / "d").start()
    xb = np.random.default_rng(0).standard_normal((20000, 32)).astype(np.float32)
    httpx.put(f"{srv.url}/v1/banks/b", content=_npy(xb), headers=NPY, timeout=60).raise_for_status()
    version = httpx.get(f"{srv.url}/v1/banks/b").json()["version"]
    httpx.put(f"{srv.url}/v1/banks/b/index", json={"spec": "OPQ16,IVF256,PQ16"}, timeout=30)
    for _ in range(100):
        if httpx.get(f"{srv.url}/v1/banks/b").json()["index"]["state"] == "training":
            break
        time.sleep(0.05)
    time.sleep(0.5)
    srv.stop(kill=True)
    srv.start()
    try:
        info = httpx.get(f"{srv.url}/v1/banks/b").json()
        assert info["version"] == version and info["count"] == 20000
        index = info["index"]
        # killed mid-build: reported, and not retried at start (a build that kills the
        # process would kill every start); killed after it: ready
        assert index["state"] == "ready" or (
            index["state"] == "failed" and "did not finish" in index["error"]
        ), index
        r = httpx.put(f"{srv.url}/v1/banks/b/index", json={"spec": "IVF64,PQ8x4fs"}, timeout=30)
        assert r.status_code == 202
        for _ in range(600):
            state = httpx.get(f"{srv.url}/v1/banks/b").json()["index"]["state"]
            if state in ("ready", "failed"):
                break
            time.sleep(0.1)
        assert state == "ready"
    finally:
        srv.stop()


def test_full_disk_answers_507_and_keeps_the_old_state(tmp_path):
    """With files capped at 4 MB (RLIMIT_FSIZE), an append needing more is a 507; the bank is
    unchanged and keeps serving, and small appends still land."""
    srv = Server(tmp_path / "d", file_size_limit=4 << 20).start()
    try:
        base = np.random.default_rng(1).standard_normal((1000, D)).astype(np.float32)
        httpx.put(
            f"{srv.url}/v1/banks/b", content=_npy(base), headers=NPY, timeout=30
        ).raise_for_status()
        before = httpx.get(f"{srv.url}/v1/banks/b").json()
        big = np.random.default_rng(2).standard_normal((100_000, D)).astype(np.float32)  # 6.4 MB
        r = httpx.post(f"{srv.url}/v1/banks/b/vectors", content=_npy(big), headers=NPY, timeout=60)
        assert r.status_code == 507 and "disk" in r.json()["detail"]
        assert httpx.get(f"{srv.url}/v1/banks/b").json() == before
        ok = httpx.post(
            f"{srv.url}/v1/banks/b/vectors", content=_npy(big[:10]), headers=NPY, timeout=30
        )
        assert ok.status_code == 200
        r = httpx.post(f"{srv.url}/v1/banks/b/search", json={"queries": base[:2].tolist(), "k": 1})
        assert r.json()["ids"] == [[0], [1]]
    finally:
        srv.stop()
    assert sorted(p.name for p in (tmp_path / "d" / "banks" / "b").glob(".*")) == []  # no temp left
