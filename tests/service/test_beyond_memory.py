"""A bank larger than the memory its server may use: built over HTTP, indexed with the default
spec, searched approximately and exactly, by a real server in a memory cgroup (v1; page cache
charged to it, no swap) of half the bank's size. Nothing is OOM-killed and every answer is
checked against float64 distances computed here from the same seeded rows."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from .conftest import Server, memory_cgroup, npy, oom_kills

pytestmark = pytest.mark.slow

D = 256
CHUNK = 65536  # rows per append: 64 MiB bodies
CHUNKS = 32  # 2,097,152 rows, 2 GiB of float32
LIMIT = 1 << 30  # the server's memory: half the bank
NQ = 200


def _chunk(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).standard_normal((CHUNK, D), dtype=np.float32)


def _rows(ids: np.ndarray) -> np.ndarray:
    """The bank's rows of these ids (default ids: chunk i holds i * CHUNK onwards)."""
    out = np.empty((len(ids), D), np.float32)
    for i in np.unique(ids // CHUNK):
        m = ids // CHUNK == i
        out[m] = _chunk(int(i))[ids[m] % CHUNK]
    return out


def _brute_force_l2(xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 top-k over every chunk, ties by lowest id."""
    q = xq.astype(np.float64)
    best_d = np.full((len(q), 0), np.inf)
    best_i = np.zeros((len(q), 0), np.int64)
    for i in range(CHUNKS):
        b = _chunk(i).astype(np.float64)
        dist = (q * q).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * q @ b.T
        ids = np.broadcast_to(np.arange(i * CHUNK, (i + 1) * CHUNK), dist.shape)
        d_all, i_all = np.hstack([best_d, dist]), np.hstack([best_i, ids])
        order = np.lexsort((i_all, d_all), axis=1)[:, :k]
        best_d = np.take_along_axis(d_all, order, 1)
        best_i = np.take_along_axis(i_all, order, 1)
    return best_d, best_i


class Peak:
    """Polls the cgroup's anonymous memory (memory.stat rss) and total charge while it runs."""

    def __init__(self, cgroup: Path) -> None:
        self.cgroup, self.rss, self.stop = cgroup, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            for line in (self.cgroup / "memory.stat").read_text().splitlines():
                if line.startswith("rss "):
                    self.rss = max(self.rss, int(line.split()[1]))

    def __enter__(self) -> Peak:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _wait_index(c: httpx.Client, srv: Server, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert srv.proc is not None and srv.proc.poll() is None, "the server died"
        info = c.get("/v1/banks/big").json()["index"]
        if info["state"] in ("ready", "failed"):
            return info
        time.sleep(0.5)
    raise AssertionError(f"index not ready after {timeout} s: {info}")


def test_a_bank_twice_the_servers_memory_is_built_indexed_and_searched(tmp_path):
    rng = np.random.default_rng(0)
    planted = np.sort(rng.choice(CHUNK * CHUNKS, NQ, replace=False))
    xq = _rows(planted) + 0.01 * rng.standard_normal((NQ, D)).astype(np.float32)
    env = {"VQSEARCH_MAX_BANK_VECTORS": str(CHUNK * CHUNKS), "VQSEARCH_AUTO_REBUILD": "0"}
    with memory_cgroup(LIMIT) as cg:
        srv = Server(tmp_path / "srv", cgroup=cg, **env).start()
        timings: dict[str, float] = {}
        try:
            with Peak(cg) as peak, httpx.Client(base_url=srv.url, timeout=600) as c:
                t0 = time.perf_counter()
                assert c.put(f"/v1/banks/big?d={D}").status_code == 201
                for i in range(CHUNKS):
                    r = c.post(
                        "/v1/banks/big/vectors",
                        content=npy(_chunk(i)),
                        headers={"content-type": "application/x-npy"},
                    )
                    assert r.status_code == 200, r.text
                timings["load"] = time.perf_counter() - t0
                bank = c.get("/v1/banks/big").json()
                assert bank["count"] == CHUNK * CHUNKS
                assert bank["bytes_on_disk"] >= CHUNK * CHUNKS * D * 4 >= 2 * LIMIT

                t0 = time.perf_counter()
                r = c.put("/v1/banks/big/index")
                assert r.status_code == 202 and "RFlat" not in r.json()["spec"]
                info = _wait_index(c, srv, 900)
                timings["index"] = time.perf_counter() - t0
                assert info["state"] == "ready", info
                assert info["rerank"] == "bank" and info["bytes"] < LIMIT / 4

                npq = {"content-type": "application/x-npy", "accept": "application/x-npz"}
                t0 = time.perf_counter()
                r = c.post("/v1/banks/big/search?mode=approx&k=10", content=npy(xq), headers=npq)
                timings["approx"] = time.perf_counter() - t0
                assert r.status_code == 200, r.text
                got = np.load(io.BytesIO(r.content))
                Da, Ia = got["distances"], got["ids"]

                t0 = time.perf_counter()
                r = c.post("/v1/banks/big/search?k=5", content=npy(xq[:20]), headers=npq)
                timings["exact"] = time.perf_counter() - t0
                assert r.status_code == 200, r.text
                got = np.load(io.BytesIO(r.content))
                De, Ie = got["distances"], got["ids"]
            assert srv.proc is not None and srv.proc.poll() is None, "the server died"
            assert oom_kills(cg) == 0
        finally:
            srv.stop()
    print(f"\ntimings {timings}; peak anonymous memory {peak.rss / 2**20:.0f} MiB")
    assert peak.rss < LIMIT

    # approximate: every distance is its id's float64 distance; the planted rows are found
    live = Ia >= 0
    rows = _rows(np.where(live, Ia, 0).reshape(-1)).reshape(NQ, 10, D).astype(np.float64)
    want = ((xq.astype(np.float64)[:, None, :] - rows) ** 2).sum(-1)
    np.testing.assert_allclose(Da[live], want[live], rtol=1e-6)
    assert np.mean(Ia[:, 0] == planted) >= 0.9
    # exact: the float64 brute force's ids and distances
    Db, Ib = _brute_force_l2(xq[:20], 5)
    np.testing.assert_array_equal(Ie, Ib)
    np.testing.assert_allclose(De, Db, rtol=1e-5)
