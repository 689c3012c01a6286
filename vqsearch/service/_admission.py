"""Admission of API requests: the body is read first (within a deadline and the size limit),
then the request takes an in-flight slot and its body's share of the memory budget.

A slow client therefore holds a connection, never a slot: 64 clients sending their bodies at
a byte a second do not shut everyone else out, and each is answered 408 at the deadline.
Health and metrics are always admitted. Pure ASGI.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException

from ._budget import LEASE, Budget
from ._errors_doc import error_body, status_kind

BODY = "vqsearch.body"  # the body the middleware read, in the ASGI scope (`_wire.read_body`)


async def _answer(
    send: Any, status: int, detail: str, headers: dict[str, str], kind: str | None = None
) -> None:
    """The app's error answer, sent from a middleware: the app has not seen the request.
    kind: the error's `type` (default: the status's phrase)."""
    body = json.dumps(error_body(detail, kind=kind or status_kind(status))).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def read_whole(
    scope: Mapping[str, Any], receive: Any, limit: int, timeout: float
) -> bytearray | None:
    """The whole body, or None if the client went away. Refuses (413) a declared or sent size
    over `limit` before reading past it, and (408) a body not sent within `timeout` seconds."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(
            413, f"body of {int(declared)} bytes exceeds the limit of {limit} bytes"
        )
    body, end = bytearray(), time.monotonic() + timeout
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(end - time.monotonic(), 0))
        except asyncio.TimeoutError:  # not the builtin on Python 3.10
            raise HTTPException(
                408,
                f"the request body was not received within {timeout:g} s "
                f"(VQSEARCH_BODY_TIMEOUT); {len(body)} bytes arrived",
            ) from None
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
        if not message.get("more_body", False):
            return body


class AdmissionMiddleware:
    def __init__(
        self,
        app: Any,
        max_inflight: int,
        max_body_bytes: int,
        body_timeout: float,
        budget: Budget,
    ) -> None:
        self.app, self.max_inflight, self.inflight = app, max_inflight, 0
        self.max_body_bytes, self.body_timeout, self.budget = max_body_bytes, body_timeout, budget

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        lease = self.budget.lease()
        try:
            body = await read_whole(scope, receive, self.max_body_bytes, self.body_timeout)
            if body is None:
                return  # nobody is left to answer
            if self.inflight >= self.max_inflight:
                raise HTTPException(
                    503,
                    f"overloaded: {self.inflight} requests under way "
                    f"(VQSEARCH_MAX_INFLIGHT={self.max_inflight}); retry later",
                    {"Retry-After": "1"},
                )
            lease.take(len(body), "the request body")
        except HTTPException as exc:  # answered here: the app has not seen the request
            await _answer(send, exc.status_code, str(exc.detail), dict(exc.headers or {}))
            return
        scope[BODY], scope[LEASE] = body, lease
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:  # what the app reads of the body it was already sent
                replayed = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return dict(await receive())  # then the real channel: http.disconnect

        self.inflight += 1  # one event loop: no lock needed
        holding = True

        def free_slot() -> None:
            nonlocal holding
            if holding:
                holding = False
                self.inflight -= 1

        async def send_then_free(message: dict[str, Any]) -> None:
            # The slot is free before the answer's last byte goes out: a client that sends its
            # next request as soon as it has the answer must not find this one still counted.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                free_slot()
            await send(message)

        try:
            await self.app(scope, replay, send_then_free)
        finally:
            free_slot()
            lease.release()
            scope.pop(BODY, None)
