"""When to retry and how long to wait: shared by both clients."""

from __future__ import annotations

import httpx

from ._core import Call

MAX_BACKOFF = 10.0


def should_retry(
    call: Call, exc: Exception | None, resp: httpx.Response | None, attempt: int, retries: int
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
        after = resp.headers.get("retry-after", "")
        if after.replace(".", "", 1).isdigit():
            return min(float(after), MAX_BACKOFF)
    return min(0.1 * 2**attempt * (0.5 + jitter), MAX_BACKOFF)
