"""Writes sent on to the data dir's one writer. A replica that serves reads (a Ray Serve
replica of the HTTP ingress, `vqsearch.ray`) answers every route declared `Writes` with the
writer's own answer, byte for byte; it reads the bank's files again before any read that
follows (`Registry.follow_writes`), so a write acknowledged anywhere is in every answer after it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._admission import BODY, _answer, read_whole
from ._shards import RETRY_AFTER_S

Headers = tuple[tuple[bytes, bytes], ...]
MAX_BODY, MAX_BODY_SECONDS = 1 << 20, 10.0  # a write outside /v1/ (none is): small, quick
# hop-by-hop, or set again by whoever sends the body on; the writer answers uncompressed so
# that its body and its headers travel unchanged
DROPPED = {b"host", b"content-length", b"transfer-encoding", b"connection", b"accept-encoding"}


@dataclass(frozen=True)
class Forwarded:
    """One HTTP request, whole: what a replica sends the writer."""

    method: str
    path: str
    query: bytes
    headers: Headers
    body: bytes


@dataclass(frozen=True)
class WriterAnswer:
    """The writer's answer, whole."""

    status: int
    headers: Headers
    body: bytes


Forward = Callable[[Forwarded], Awaitable[WriterAnswer]]


class WriterUnavailableError(Exception):
    """The writer cannot be reached (it is restarting): the request gets 503 with Retry-After;
    nothing was written, or the write is whole on disk (the writer acknowledges only then)."""


class ForwardWrites:
    """ASGI middleware of a replica: a request matching one of `writes` (path regex, methods)
    goes to `forward` with its body read whole (under the admission limits outside), and its
    answer is the writer's. Every other request is this app's."""

    def __init__(
        self,
        app: ASGIApp,
        forward: Forward,
        writes: Callable[[], list[tuple[re.Pattern[str], frozenset[str]]]],
    ) -> None:
        self.app, self.forward, self._writes = app, forward, writes
        self._routes: list[tuple[re.Pattern[str], frozenset[str]]] | None = None

    def is_write(self, scope: Scope) -> bool:
        if self._routes is None:
            self._routes = self._writes()
        path, method = scope["path"], scope["method"]
        return any(method in m and r.match(path) for r, m in self._routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.is_write(scope):
            await self.app(scope, receive, send)
            return
        body = scope.get(BODY)  # read whole by the admission middleware outside
        if body is None:
            body = await read_whole(scope, receive, MAX_BODY, MAX_BODY_SECONDS)
            if body is None:
                return  # the client went away
        request = Forwarded(
            scope["method"],
            scope["path"],
            scope.get("query_string", b""),
            tuple((k, v) for k, v in scope["headers"] if k.lower() not in DROPPED),
            bytes(body),
        )
        try:
            answer = await self.forward(request)
        except WriterUnavailableError as exc:
            retry = {"Retry-After": str(RETRY_AFTER_S)}
            await _answer(send, 503, str(exc), retry, kind="writer_unavailable")
            return
        await _send(send, answer)


async def _send(send: Send, answer: WriterAnswer) -> None:
    headers = [(k, v) for k, v in answer.headers if k.lower() != b"content-length"]
    headers.append((b"content-length", b"%d" % len(answer.body)))
    start: Message = {"type": "http.response.start", "status": answer.status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": answer.body})


class LocalWriter:
    """The writer's side: a forwarded request run through its app, in process."""

    def __init__(self, app: Any) -> None:
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://writer", timeout=None
        )

    async def __call__(self, request: Forwarded) -> WriterAnswer:
        r = await self._client.request(
            request.method,
            httpx.URL(request.path, query=request.query),
            headers=list(request.headers),
            content=request.body,
        )
        return WriterAnswer(r.status_code, tuple(r.headers.raw), r.content)

    async def aclose(self) -> None:
        await self._client.aclose()
