"""Micro-batching: concurrent small queries share one engine call and get their own answers."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from tests.conftest import brute_force
from tests.service.conftest import CODEBOOK, app_client
from vqsearch.index import Bank
from vqsearch.service import _searching
from vqsearch.service._searching import Batcher


async def _concurrent_singles(api, rng, n: int):
    qs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(n)]
    rs = await asyncio.gather(
        *(api.post("/v1/banks/cb/search", json={"queries": q.tolist(), "k": 3}) for q in qs)
    )
    return qs, rs


@pytest.fixture
def engine_calls(monkeypatch) -> list[int]:
    """The number of query rows of every Bank.search call the server makes."""
    calls: list[int] = []
    real = Bank.search
    monkeypatch.setattr(
        Bank,
        "search",
        lambda self, xq, k, device="auto", precision="auto": (
            calls.append(len(xq)) or real(self, xq, k, device, precision)
        ),
    )
    return calls


async def test_concurrent_queries_coalesce_and_answers_stay_exact(settings, rng, engine_calls):
    """40 concurrent one-vector searches run as far fewer engine calls, each answer exact."""
    async with app_client(settings.model_copy(update={"batch_max_wait_ms": 50})) as api:
        await api.put("/v1/banks/cb", json={"vectors": CODEBOOK.tolist()})
        qs, rs = await _concurrent_singles(api, rng, 40)
    assert sum(engine_calls) == 40 and len(engine_calls) < 10, engine_calls
    for q, r in zip(qs, rs, strict=True):
        assert r.status_code == 200
        np.testing.assert_array_equal(r.json()["ids"], brute_force(q, CODEBOOK, 3, "l2")[1])


async def test_batching_off_runs_each_request_alone(settings, rng, engine_calls):
    """VQSEARCH_BATCH_MAX_ROWS=0: one engine call per request."""
    async with app_client(settings.model_copy(update={"batch_max_rows": 0})) as api:
        await api.put("/v1/banks/cb", json={"vectors": CODEBOOK.tolist()})
        await _concurrent_singles(api, rng, 12)
    assert engine_calls == [1] * 12


async def test_a_bad_request_does_not_spoil_the_batch(settings, rng):
    """Among concurrent requests, a wrong-d or NaN one gets its 422; the others their answers."""
    async with app_client(settings.model_copy(update={"batch_max_wait_ms": 50})) as api:
        await api.put("/v1/banks/cb", json={"vectors": CODEBOOK.tolist()})
        good = [{"queries": CODEBOOK[i : i + 1].tolist(), "k": 1} for i in range(10)]
        bad = [{"queries": [[0.0] * 15], "k": 1}, {"queries": [[float("nan")] * 16], "k": 1}]
        bodies = good[:5] + bad + good[5:]
        rs = await asyncio.gather(
            *(
                api.post(
                    "/v1/banks/cb/search",
                    content=__import__("json").dumps(b, allow_nan=True),
                    headers={"content-type": "application/json"},
                )
                for b in bodies
            )
        )
        statuses = [r.status_code for r in rs]
        assert statuses == [200] * 5 + [422, 422] + [200] * 5
        assert [r.json()["ids"][0][0] for r in rs if r.status_code == 200] == list(range(10))
        assert "vqsearch_batch_queue_rows 0.0" in (await api.get("/metrics")).text


async def test_batches_keep_gathering_while_every_search_thread_is_busy():
    """Past max_wait, requests whose search could not start anyway (the one search thread is
    busy) join one batch rather than queue as several small searches."""
    batcher = Batcher(max_rows=100, max_wait=0.001, threads=1)
    calls: list[int] = []
    release = threading.Event()

    def search(xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(xs))
        if len(calls) == 1:
            release.wait(10)
        return xs[:, :1], xs[:, :1].astype(np.int64)

    first = asyncio.ensure_future(batcher.run("k", np.zeros((1, 4), np.float32), search))
    await asyncio.sleep(0.02)  # the first batch is searching now, and holds the thread
    later = []
    for i in range(5):  # each arrives well past the previous one's max_wait
        x = np.full((1, 4), i + 1, np.float32)
        later.append(asyncio.ensure_future(batcher.run("k", x, search)))
        await asyncio.sleep(0.01)
    release.set()
    await first
    answers = await asyncio.gather(*later)
    assert calls == [1, 5]
    assert [float(D[0, 0]) for D, _ in answers] == [1, 2, 3, 4, 5]


async def test_large_requests_run_in_chunks_sized_by_time(monkeypatch):
    """A large request's chunks follow the time each takes: a search whose cost per row is
    higher than the first guess gets smaller chunks (a turn for others every CHUNK_SECONDS),
    a cheaper one larger chunks; the rows come back in order, each exactly once."""
    monkeypatch.setattr(_searching, "CHUNK_SECONDS", 0.02)
    for per_row, first, nq in ((1e-4, 1000, 5000), (1e-6, 10, 60_000)):
        sizes: list[int] = []

        def search(xs, per_row=per_row, sizes=sizes):
            sizes.append(len(xs))
            time.sleep(per_row * len(xs))
            return xs.astype(np.float32), xs.astype(np.int64)

        batcher = Batcher(max_rows=4, max_wait=0.0)
        x = np.arange(nq)[:, None]
        D, I = await batcher.run("k", x, search, chunk=first)
        np.testing.assert_array_equal(I, x)
        np.testing.assert_array_equal(D, x)
        assert sum(sizes) == len(x) and sizes[0] == first
        aim = 0.02 / per_row  # the rows that take CHUNK_SECONDS
        assert 0.5 * aim < sizes[-2] < 2 * aim, (per_row, sizes)


def test_next_chunk_aims_at_the_chunk_time_within_bounds():
    s = _searching.CHUNK_SECONDS
    assert _searching.next_chunk(100, s) == 100
    assert _searching.next_chunk(100, s / 2) == 200
    assert _searching.next_chunk(100, s / 100) == 400  # at most 4x more
    assert _searching.next_chunk(800, 100 * s) == 100  # at most 8x fewer
    assert _searching.next_chunk(1, 100 * s) == 1
