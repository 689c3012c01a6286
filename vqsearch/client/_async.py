"""`AsyncClient`: the API over `httpx.AsyncClient`, chunks sent concurrently."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import httpx

from ._core import VERSION_HEADER, Call, Methods, Plan, index_done, sweep_done
from ._exceptions import JobTimeoutError
from ._retry import final, next_delay


class AsyncClient(Methods):
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
        super().__init__(binary, chunk_size)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
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

    async def send(self, call: Call) -> httpx.Response:
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

    async def _one(self, call: Call, sem: asyncio.Semaphore) -> Any:
        async with sem:
            return call.parse(await self.send(call))

    async def _execute(self, plan: Plan) -> Any:
        sem = asyncio.Semaphore(self.max_concurrency)
        first, *later = plan.calls
        resp = await self.send(first)
        plan.pin(later, resp)
        rest = await asyncio.gather(*(self._one(c, sem) for c in later))
        return plan.combine([first.parse(resp), *rest])

    def _run(self, plan: Plan) -> Any:
        return self._execute(plan)

    async def _poll(
        self,
        fetch: Callable[[], Awaitable[Any]],
        done: Callable[[Any], bool],
        timeout: float,
        poll: float,
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(state := await fetch()):
            if loop.time() > deadline:
                raise JobTimeoutError(f"not finished after {timeout} s: {state}")
            await asyncio.sleep(poll)
        return state

    async def wait_index(self, name: str, timeout: float = 600.0, poll: float = 0.2) -> Any:
        """Poll the bank until its index is ready (returns the bank info) or failed (raises)."""
        return await self._poll(lambda: self.get_bank(name), index_done, timeout, poll)

    async def wait_tradeoff(self, name: str, timeout: float = 3600.0, poll: float = 0.2) -> Any:
        """Poll until the bank's sweep is done; returns {"state", "progress", "report"}."""
        return await self._poll(lambda: self.get_tradeoff(name), sweep_done, timeout, poll)


__all__ = ["VERSION_HEADER", "AsyncClient"]
