"""When to retry and how long to wait: shared by both clients."""

from __future__ import annotations

from typing import Any

import httpx

from .._wire_names import RETRY_AFTER_HEADER
from ._core import Call, raise_for_status
from ._exceptions import TransportError

MAX_BACKOFF = 10.0


def should_retry(
    call: Call[Any], exc: Exception | None, resp: httpx.Response | None, attempt: int, retries: int
) -> bool:
    """Idempotent calls retry connection errors and 503; others only a refused connection,
    which proves the request was never delivered."""
    if attempt >= retries:
        return False
    if call.idempotent:
        return True
    return isinstance(exc, httpx.ConnectError)


def backoff_seconds(attempt: int, resp: httpx.Response | None, jitter: float) -> float:
    """Retry-After when the server gives it (seconds), else 0.1 * 2^attempt with jitter."""
    if resp is not None:
        after = str(resp.headers.get(RETRY_AFTER_HEADER, ""))
        if after.replace(".", "", 1).isdigit():
            return min(float(after), MAX_BACKOFF)
    return min(0.1 * 2.0**attempt * (0.5 + jitter), MAX_BACKOFF)


def next_delay(
    call: Call[Any],
    attempt: int,
    retries: int,
    exc: Exception | None,
    resp: httpx.Response | None,
    jitter: float,
) -> float | None:
    """Seconds to wait before trying `call` again, or None when this outcome is final."""
    retryable = exc is not None or (resp is not None and resp.status_code == 503)
    if retryable and should_retry(call, exc, resp, attempt, retries):
        return backoff_seconds(attempt, resp, jitter)
    return None


def final(call: Call[Any], exc: Exception | None, resp: httpx.Response | None) -> httpx.Response:
    """The response of a finished call, or its error as a client exception."""
    if exc is not None or resp is None:
        raise TransportError(f"{call.method} {call.path}: {exc!r}") from exc
    raise_for_status(resp)
    return resp
