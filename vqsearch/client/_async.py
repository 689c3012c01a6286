"""`AsyncClient`: the API over `httpx.AsyncClient`, chunks sent concurrently."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx
import numpy as np
import numpy.typing as npt

from .._wire_names import AUTHORIZATION_HEADER, BEARER
from ._core import Call, Plan, Requests, index_done, sweep_done
from ._exceptions import JobTimeoutError, VQSearchClientError
from ._retry import final, next_delay
from ._types import BankInfo, Health, IndexInfo, NearestResult, SearchResult, TradeoffJob

T = TypeVar("T")


class AsyncClient:
    """Async client: `async with AsyncClient("http://host:8000") as c: await c.search(...)`.

    Binary `.npy`/`.npz` transport unless `binary=False` (JSON). Batches over `chunk_size`
    rows go as concurrent requests, at most `max_concurrency` in flight, reassembled in order and
    pinned to the bank version the first chunk saw. Idempotent calls are retried `retries` times
    on connection errors and 503, with exponential backoff honouring `Retry-After`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        binary: bool = True,
        chunk_size: int = 65536,
        max_concurrency: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._requests = Requests(binary, chunk_size)
        headers = {AUTHORIZATION_HEADER: f"{BEARER} {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, headers=headers, transport=transport
        )
        self.retries, self.max_concurrency = retries, max_concurrency

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call[Any]) -> httpx.Response:
        """One call, with retries; every failure leaves as a `VQSearchClientError`."""
        for attempt in itertools.count():
            exc, resp = None, None
            try:
                resp = await self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    content=call.content,
                    headers=call.headers,
                )
            except httpx.TransportError as e:
                exc = e
            delay = next_delay(call, attempt, self.retries, exc, resp, random.random())
            if delay is None:
                return final(call, exc, resp)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _one(self, call: Call[T], sem: asyncio.Semaphore) -> T:
        async with sem:
            return call.read(await self.send(call))

    async def _run(self, plan: Plan[T]) -> T:
        if plan.sequential:
            done: list[Any] = []
            for call in plan.calls:
                try:
                    done.append(call.read(await self.send(call)))
                except VQSearchClientError as exc:
                    plan.failed_after(exc, done)
                    raise
            return plan.combine(done)
        sem = asyncio.Semaphore(self.max_concurrency)
        first, *later = plan.calls
        resp = await self.send(first)
        plan.pin(later, resp)
        rest = await asyncio.gather(*(self._one(c, sem) for c in later))
        return plan.combine([first.read(resp), *rest])

    async def _poll(
        self,
        fetch: Callable[[], Awaitable[T]],
        done: Callable[[T], bool],
        timeout: float,
        poll: float,
    ) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(state := await fetch()):
            if loop.time() > deadline:
                raise JobTimeoutError(f"not finished after {timeout} s: {state}")
            await asyncio.sleep(poll)
        return state

    # -- routes (the same in Client) --------------------------------------------------------

    async def health(self) -> Health:
        """`status` "ok" while the server process is alive."""
        return await self._run(self._requests.health())

    async def ready(self) -> Health:
        """`status` "ready" and the number of `banks` once they are loaded (503 before)."""
        return await self._run(self._requests.ready())

    async def list_banks(self) -> list[BankInfo]:
        """Every bank's info, by name."""
        return await self._run(self._requests.list_banks())

    async def get_bank(self, name: str) -> BankInfo:
        """Bank info: d, count, metric, bytes, version, index state, tradeoff sweep, usage."""
        return await self._run(self._requests.get_bank(name))

    async def create_bank(
        self,
        name: str,
        vectors: Any = None,
        ids: Any = None,
        metric: str = "l2",
        d: int | None = None,
        shards: int = 1,
    ) -> BankInfo:
        """Create a bank from vectors (n, d), or empty with `d`; `shards` > 1 splits its rows
        over that many shard actors (a server on a Ray cluster). Returns its info."""
        plan = self._requests.create_bank(
            name, vectors=vectors, ids=ids, metric=metric, d=d, shards=shards
        )
        return await self._run(plan)

    async def delete_bank(self, name: str) -> str:
        """Delete the bank and its files; returns its name."""
        return await self._run(self._requests.delete_bank(name))

    async def add(self, name: str, vectors: Any, ids: Any = None) -> npt.NDArray[np.int64]:
        """Append vectors (n, d); returns the ids (n,) they were given. Never retried. More
        than ADD_CHUNK_BYTES (64 MiB) of vectors go as several appends, in order, each durable
        once answered: if one fails, its error's `added` holds the ids added before it."""
        return await self._run(self._requests.add(name, vectors=vectors, ids=ids))

    async def remove(self, name: str, ids: Any) -> int:
        """Delete vectors by id (all or none); returns how many were removed."""
        return await self._run(self._requests.remove(name, ids=ids))

    async def search(
        self,
        name: str,
        queries: Any,
        k: int = 10,
        mode: str = "exact",
        nprobe: int | None = None,
        k_factor: float | None = None,
        version: str | None = None,
        target_recall: float | None = None,
    ) -> SearchResult:
        """Top-k: `SearchResult` (distances, ids), each (nq, k). Large batches go in chunks.
        mode: exact, approx, or auto (fastest measured setting reaching `target_recall`)."""
        plan = self._requests.search(
            name,
            queries=queries,
            k=k,
            mode=mode,
            nprobe=nprobe,
            k_factor=k_factor,
            version=version,
            target_recall=target_recall,
        )
        return await self._run(plan)

    async def nearest(
        self,
        name: str,
        z: Any,
        channel_axis: int | None = None,
        return_quantized: bool = False,
        return_error: bool = False,
        codes_dtype: str = "int64",
        mode: str = "exact",
        nprobe: int | None = None,
        version: str | None = None,
        target_recall: float | None = None,
    ) -> NearestResult:
        """Nearest code of every vector: `NearestResult`. z (..., d) -> codes (...); with
        channel_axis=1, z (B, C, H, W) -> codes (B, H, W). Chunks split the first axis."""
        plan = self._requests.nearest(
            name,
            z=z,
            channel_axis=channel_axis,
            return_quantized=return_quantized,
            return_error=return_error,
            codes_dtype=codes_dtype,
            mode=mode,
            nprobe=nprobe,
            version=version,
            target_recall=target_recall,
        )
        return await self._run(plan)

    async def decode(
        self, name: str, codes: Any, channel_axis: int | None = None, version: str | None = None
    ) -> npt.NDArray[np.float32]:
        """Codes of any shape -> vectors codes.shape + (d,) (or d at `channel_axis`)."""
        plan = self._requests.decode(name, codes=codes, channel_axis=channel_axis, version=version)
        return await self._run(plan)

    async def build_index(
        self, name: str, spec: str | None = None, train_size: int | None = None
    ) -> IndexInfo:
        """Start building the bank's approximate index (202); returns the index state."""
        return await self._run(self._requests.build_index(name, spec=spec, train_size=train_size))

    async def tradeoff(
        self,
        name: str,
        queries: Any = None,
        specs: Sequence[str] = (),
        n_queries: int | None = None,
        batch_sizes: Sequence[int] | None = None,
        min_seconds: float | None = None,
    ) -> TradeoffJob:
        """Start a recall/speed sweep of the bank (202); returns the job state."""
        plan = self._requests.tradeoff(
            name,
            queries=queries,
            specs=specs,
            n_queries=n_queries,
            batch_sizes=batch_sizes,
            min_seconds=min_seconds,
        )
        return await self._run(plan)

    async def get_tradeoff(self, name: str) -> TradeoffJob:
        """The sweep's state and progress, and its `report`: the last measured curve."""
        return await self._run(self._requests.get_tradeoff(name))

    async def wait_index(self, name: str, timeout: float = 600.0, poll: float = 0.2) -> BankInfo:
        """Poll the bank until its index is ready (returns the bank info) or failed (raises)."""
        return await self._poll(lambda: self.get_bank(name), index_done, timeout, poll)

    async def wait_tradeoff(
        self, name: str, timeout: float = 3600.0, poll: float = 0.2
    ) -> TradeoffJob:
        """Poll until the bank's sweep is done (returns the job, with its report) or failed
        (raises)."""
        return await self._poll(lambda: self.get_tradeoff(name), sweep_done, timeout, poll)


__all__ = ["AsyncClient"]
