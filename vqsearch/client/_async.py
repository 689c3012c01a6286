"""`AsyncClient`: the API over `httpx.AsyncClient`, chunks sent concurrently."""

from __future__ import annotations

import asyncio
import random
from types import TracebackType
from typing import Any

import httpx

from ._core import VERSION_HEADER, Call, Methods, Plan, raise_for_status
from ._exceptions import ServiceUnavailableError, TransportError
from ._retry import backoff_seconds, should_retry


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
        for attempt in range(self.retries + 1):
            try:
                resp = await self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    content=call.content,
                    headers=call.headers,
                )
            except httpx.TransportError as exc:
                if not should_retry(call, exc, None, attempt, self.retries):
                    raise TransportError(f"{call.method} {call.path}: {exc!r}") from exc
                await asyncio.sleep(backoff_seconds(attempt, None, random.random()))
                continue
            if resp.status_code == 503 and should_retry(call, None, resp, attempt, self.retries):
                await asyncio.sleep(backoff_seconds(attempt, resp, random.random()))
                continue
            raise_for_status(resp)
            return resp
        raise ServiceUnavailableError(503, "retries exhausted", "")  # pragma: no cover

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

    async def wait_index(self, name: str, timeout: float = 600.0, poll: float = 0.2) -> Any:
        """Poll the bank until its index is ready (returns the bank info) or failed (raises)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            info = await self.get_bank(name)
            if done_or_raise(info):
                return info
            if loop.time() > deadline:
                raise TimeoutError(
                    f"index of {name!r} not ready after {timeout} s: {info['index']}"
                )
            await asyncio.sleep(poll)

    async def wait_tradeoff(self, name: str, timeout: float = 3600.0, poll: float = 0.2) -> Any:
        """Poll until the bank's sweep is done; returns {"state", "progress", "report"}."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            job = await self.get_tradeoff(name)
            if sweep_done_or_raise(job):
                return job
            if loop.time() > deadline:
                raise TimeoutError(f"sweep of {name!r} not done after {timeout} s: {job['state']}")
            await asyncio.sleep(poll)


def sweep_done_or_raise(job: dict[str, Any]) -> bool:
    if job.get("state") == "failed":
        raise RuntimeError(f"tradeoff sweep failed: {job.get('error')}")
    return bool(job.get("state") == "done")


def done_or_raise(info: dict[str, Any]) -> bool:
    index = info.get("index") or {}
    if index.get("state") == "failed":
        raise RuntimeError(f"index build failed: {index.get('error')}")
    return bool(index.get("state") == "ready")


__all__ = ["VERSION_HEADER", "AsyncClient"]
