"""Running a query for a route: which setting answers it (exact, the approximate index, or
`auto`'s measured pick), and micro-batching of concurrent small requests into one engine call.

Batching never changes an answer: every query is searched independently (exactly, or by faiss
with the same parameters), so coalescing only amortises the scan over the bank.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import HTTPException

from vqsearch.index import EmptyBankError, Queries, check_k, search_index

from ._entry import Entry
from ._setting import Setting
from ._sweeps import auto_setting

Result = tuple[np.ndarray, np.ndarray]
Rows = Any  # what the batcher carries: validated `Queries`, or plain arrays (len, slices)
SEARCH_THREADS = 2  # a long search does not hold up every other request


# Parameters that apply to one mode only: given with another, they would be silently ignored.
MODE_PARAMS = {"nprobe": "approx", "k_factor": "approx", "target_recall": "auto"}


def _check_mode_params(p: Any) -> None:
    wrong = [k for k, mode in MODE_PARAMS.items() if k in p.model_fields_set and p.mode != mode]
    if wrong:
        raise HTTPException(
            422,
            "; ".join(f"{k} applies to mode={MODE_PARAMS[k]} only" for k in wrong)
            + f" (this request has mode={p.mode})",
        )


def resolve(entry: Entry, p: Any, measure: str, nq: int) -> Setting:
    """The setting that will answer: exact, or the index spec and the search parameters that
    apply to it (nprobe for IVF, k_factor for every index: its shortlist's size)."""
    _check_mode_params(p)
    if p.mode == "auto":
        return auto_setting(entry, p.target_recall, measure, nq)
    if p.mode == "exact":
        return Setting()
    index = entry.index
    if index is None:
        state = entry.build.state if entry.build else "absent"
        raise HTTPException(
            409,
            f"bank {entry.name!r} has no ready approximate index (index state: {state}); "
            "build one with PUT /v1/banks/{name}/index or use mode=exact",
        )
    nprobe = k_factor = None
    if index.nlist is not None:
        nprobe = p.nprobe or index.nprobe
    elif p.nprobe is not None:
        raise HTTPException(422, f"nprobe applies to IVF indexes; {entry.name!r} has {index.spec}")
    # every index's shortlist of k x k_factor is re-ranked: by its RFlat copy, else the bank
    k_factor = float(p.k_factor or index.k_factor)
    return Setting(index.spec, nprobe, k_factor)


def execute(
    entry: Entry, xq: Queries, setting: Setting, k: int, device: str, precision: str
) -> Result:
    if setting.exact:
        if entry.placed is not None:  # the shards, at the version every write so far made
            return entry.placed.search(xq, k, lambda: entry.bank.version)
        return entry.bank.search(xq, k, device=device, precision=precision)
    index = entry.index
    if index is None or index.spec != setting.spec:
        raise HTTPException(409, f"the approximate index of {entry.name!r} changed; retry")
    if entry.placed is not None:  # each shard's own index of the spec, over its rows
        return entry.approx_on_shards(xq, k, index, setting.nprobe, setting.k_factor)
    return search_index(entry.bank, index, xq, k, setting.nprobe, setting.k_factor)


def _join(parts: list[Any]) -> Any:
    """Validated queries stay validated when joined; plain arrays are concatenated."""
    return Queries.join(parts) if isinstance(parts[0], Queries) else np.concatenate(parts)


@dataclass
class _Batch:
    parts: list[Rows] = field(default_factory=list)
    waiters: list[asyncio.Future[Result]] = field(default_factory=list)
    rows: int = 0
    full: asyncio.Event = field(default_factory=asyncio.Event)


class Batcher:
    """Coalesces concurrent requests with the same key (bank, setting, k) until `max_rows`
    query rows are waiting or the first has waited `max_wait` seconds, then runs one search
    and hands each request its rows back. Requests of `max_rows` or more go straight through;
    `max_rows = 0` turns batching off.

    A batch past its `max_wait` whose search could not start anyway (every search thread busy)
    stays open and keeps gathering until a thread frees up: under load, batches grow to fill
    the time a search takes, instead of queueing as many small searches, each of which reads
    the whole bank."""

    def __init__(self, max_rows: int, max_wait: float, threads: int = SEARCH_THREADS) -> None:
        self.max_rows, self.max_wait, self.threads = max_rows, max_wait, threads
        self.open: dict[tuple[Any, ...], _Batch] = {}
        self.waiting_rows = 0  # the queue depth /metrics reports
        self.running = 0  # searches under way (batched ones)
        self.changed = asyncio.Event()  # a search ended, or a batch filled up
        # Searches run on a few threads of their own, not on anyio's pool of 40: every thread
        # that runs torch keeps an OpenMP team, oneDNN scratch and a malloc arena (measured:
        # RSS +500 MB in 45 s of mixed load with the shared pool), and each search already
        # uses every core.
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="vqsearch-search")

    async def _search(self, fn: Callable[[Rows], Result], xq: Rows) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, xq)

    async def run(
        self,
        key: tuple[Any, ...],
        xq: Rows,
        fn: Callable[[Rows], Result],
        chunk: int | None = None,
        deadline: Any = None,
    ) -> Result:
        """fn over xq's rows. A request of `max_rows` or more runs alone, in chunks (`chunk`
        rows the first), `deadline.check()` awaited before each."""
        if len(xq) >= self.max_rows:
            return await self._chunked(xq, fn, chunk or len(xq), deadline)
        batch = self.open.get(key)
        if batch is None:
            batch = self.open[key] = _Batch()
            asyncio.get_running_loop().create_task(self._flush(key, batch, fn))
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        batch.parts.append(xq)
        batch.waiters.append(fut)
        batch.rows += len(xq)
        self.waiting_rows += len(xq)
        if batch.rows >= self.max_rows:
            self.open.pop(key, None)  # later arrivals start a new batch
            batch.full.set()
            self.changed.set()
        return await fut

    async def _chunked(
        self, xq: Rows, fn: Callable[[Rows], Result], rows: int, deadline: Any
    ) -> Result:
        """fn over xq in chunks, the first of `rows` rows, each next one sized from the time
        the last took to take about CHUNK_SECONDS (`next_chunk`)."""
        if len(xq) <= rows:
            return await self._search(fn, xq)

        def timed(part: Rows) -> tuple[Result, float]:
            t0 = time.perf_counter()
            return fn(part), time.perf_counter() - t0

        parts: list[Result] = []
        i0 = 0
        while i0 < len(xq):
            if deadline is not None:
                await deadline.check()
            loop = asyncio.get_running_loop()
            part, seconds = await loop.run_in_executor(self.pool, timed, xq[i0 : i0 + rows])
            parts.append(part)
            i0 += rows
            rows = next_chunk(rows, seconds)
        return np.concatenate([D for D, _ in parts]), np.concatenate([I for _, I in parts])

    async def _flush(
        self, key: tuple[Any, ...], batch: _Batch, fn: Callable[[Rows], Result]
    ) -> None:
        with contextlib.suppress(asyncio.TimeoutError):  # not the builtin on Python 3.10
            await asyncio.wait_for(batch.full.wait(), self.max_wait)
        while self.running >= self.threads and not batch.full.is_set():
            self.changed.clear()
            await self.changed.wait()
        if self.open.get(key) is batch:
            del self.open[key]
        self.waiting_rows -= batch.rows
        self.running += 1
        try:
            D, I = await self._search(fn, _join(batch.parts))
        except Exception as exc:  # every waiter gets the failure; none hangs
            for fut in batch.waiters:
                if not fut.done():
                    fut.set_exception(exc)
            return
        finally:
            self.running -= 1
            self.changed.set()
        i0 = 0
        for part, fut in zip(batch.parts, batch.waiters, strict=True):
            if not fut.done():
                fut.set_result((D[i0 : i0 + len(part)], I[i0 : i0 + len(part)]))
            i0 += len(part)


# A large request runs as several engine calls (chunks): between calls it checks its deadline
# and its client, and other requests' calls, queued on the same search threads, get their
# turn. The first chunk is sized by the bank (rows x d multiply-adds per query), the next ones
# by the time the last took, so that a turn comes about every CHUNK_SECONDS on any machine and
# under any load (searches that share the cores take longer each).
CHUNK_WORK = 1 << 33
CHUNK_SECONDS = 0.25


def chunk_rows(ntotal: int, d: int) -> int:
    return max(1, CHUNK_WORK // max(1, ntotal * d))


def next_chunk(rows: int, seconds: float) -> int:
    """Rows for the next chunk after one of `rows` rows took `seconds`: aimed at CHUNK_SECONDS,
    at most 4x more (one fast chunk is not a trend) or 8x fewer than the last."""
    aim = rows * CHUNK_SECONDS / max(seconds, 1e-6)
    return max(1, int(min(4 * rows, max(rows / 8, aim))))


async def run_query(
    request: Any, entry: Entry, xq: np.ndarray, p: Any, k: int, measure: str
) -> tuple[np.ndarray, np.ndarray, Setting]:
    """Validate, pick the setting, search (batched with other requests when small, in chunks
    under the request's deadline when large)."""
    app_state = request.app.state
    # a bad request is refused here, alone: it must not fail the batch it would have joined;
    # validated once, the queries are not checked again by the engine
    x = Queries.of(xq, entry.bank.d, entry.bank.metric)
    if entry.bank.ntotal == 0:
        raise EmptyBankError(f"bank {entry.name!r} is empty")
    check_k(k, entry.bank.ntotal)
    if entry.reservoir is not None:
        entry.reservoir.offer(x.numpy())
    setting = resolve(entry, p, measure, len(x))
    settings = app_state.settings
    device, precision = settings.device, settings.exact_precision
    key = (id(entry), *setting.key, k)
    deadline = Deadline(request, settings.request_timeout)
    D, I = await app_state.batcher.run(
        key,
        x,
        lambda xs: execute(entry, xs, setting, k, device, precision),
        chunk_rows(entry.bank.ntotal, entry.bank.d),
        deadline,
    )
    return D, I, setting


class Deadline:
    """A request's time limit and its client: `check` raises once either is gone."""

    def __init__(self, request: Any, seconds: float) -> None:
        self.request, self.seconds = request, seconds
        self.end = time.monotonic() + seconds

    async def check(self) -> None:
        if time.monotonic() > self.end:
            raise HTTPException(
                504,
                f"the search ran past VQSEARCH_REQUEST_TIMEOUT={self.seconds:g} s and was "
                "stopped; send fewer queries or a smaller k",
            )
        if await self.request.is_disconnected():
            raise HTTPException(499, "the client went away; the search was stopped")
