"""`Client`: the same API over `httpx.Client`; chunks are sent one after another."""

from __future__ import annotations

import random
import time
from types import TracebackType
from typing import Any

import httpx

from ._async import done_or_raise, sweep_done_or_raise
from ._core import Call, Methods, Plan, raise_for_status
from ._exceptions import ServiceUnavailableError, TransportError
from ._retry import backoff_seconds, should_retry


class Client(Methods):
    """Blocking client with the methods of `AsyncClient`; use as a context manager."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        binary: bool = True,
        chunk_size: int = 65536,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(binary, chunk_size)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, headers=headers, transport=transport
        )
        self.retries = retries

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: Call) -> httpx.Response:
        """One call, with retries; every failure leaves as a `VQSearchClientError`."""
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    content=call.content,
                    headers=call.headers,
                )
            except httpx.TransportError as exc:
                if not should_retry(call, exc, None, attempt, self.retries):
                    raise TransportError(f"{call.method} {call.path}: {exc!r}") from exc
                time.sleep(backoff_seconds(attempt, None, random.random()))
                continue
            if resp.status_code == 503 and should_retry(call, None, resp, attempt, self.retries):
                time.sleep(backoff_seconds(attempt, resp, random.random()))
                continue
            raise_for_status(resp)
            return resp
        raise ServiceUnavailableError(503, "retries exhausted", "")  # pragma: no cover

    def _run(self, plan: Plan) -> Any:
        first, *later = plan.calls
        resp = self.send(first)
        plan.pin(later, resp)
        return plan.combine([first.parse(resp), *(c.parse(self.send(c)) for c in later)])

    def wait_index(self, name: str, timeout: float = 600.0, poll: float = 0.2) -> Any:
        """Poll the bank until its index is ready (returns the bank info) or failed (raises)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.get_bank(name)
            if done_or_raise(info):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"index of {name!r} not ready after {timeout} s: {info['index']}"
                )
            time.sleep(poll)

    def wait_tradeoff(self, name: str, timeout: float = 3600.0, poll: float = 0.2) -> Any:
        """Poll until the bank's sweep is done; returns {"state", "progress", "report"}."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_tradeoff(name)
            if sweep_done_or_raise(job):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"sweep of {name!r} not done after {timeout} s: {job['state']}")
            time.sleep(poll)
