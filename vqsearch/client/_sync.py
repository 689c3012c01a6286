"""`Client`: the same API over `httpx.Client`; chunks are sent one after another."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx

from ._core import Call, Methods, Plan, index_done, sweep_done
from ._exceptions import JobTimeoutError
from ._retry import final, next_delay


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
        for attempt in itertools.count():
            exc, resp = None, None
            try:
                resp = self._http.request(
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
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _run(self, plan: Plan) -> Any:
        first, *later = plan.calls
        resp = self.send(first)
        plan.pin(later, resp)
        return plan.combine([first.parse(resp), *(c.parse(self.send(c)) for c in later)])

    def _poll(
        self, fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float, poll: float
    ) -> Any:
        deadline = time.monotonic() + timeout
        while not done(state := fetch()):
            if time.monotonic() > deadline:
                raise JobTimeoutError(f"not finished after {timeout} s: {state}")
            time.sleep(poll)
        return state

    def wait_index(self, name: str, timeout: float = 600.0, poll: float = 0.2) -> Any:
        """Poll the bank until its index is ready (returns the bank info) or failed (raises)."""
        return self._poll(lambda: self.get_bank(name), index_done, timeout, poll)

    def wait_tradeoff(self, name: str, timeout: float = 3600.0, poll: float = 0.2) -> Any:
        """Poll until the bank's sweep is done; returns {"state", "progress", "report"}."""
        return self._poll(lambda: self.get_tradeoff(name), sweep_done, timeout, poll)
