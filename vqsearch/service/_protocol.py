"""uvicorn's httptools protocol with two limits it lacks: a deadline for a request's headers
(uvicorn times out idle keep-alive connections only, so a client that sends its headers a byte
at a time holds its connection forever) and a cap on open connections (each holds a file
descriptor; ~20,000 slow ones exhaust them). `vqsearch serve` passes it as uvicorn's `http`.

Bodies have their deadline in the admission middleware (`_admission`), where a 408 can be sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ._settings import Settings


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    # Set by `vqsearch serve` before uvicorn starts; a spawned worker reads VQSEARCH_* itself.
    header_timeout: float | None = None
    max_connections: int | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        cls = type(self)
        if cls.header_timeout is None or cls.max_connections is None:
            settings = Settings()
            cls.header_timeout, cls.max_connections = (
                settings.header_timeout,
                settings.max_connections,
            )
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > cls.max_connections:
            transport.close()  # over the cap: closed before it is read
            return
        self._arm()

    def _arm(self) -> None:
        assert self.header_timeout is not None
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._arm()  # the next request's headers have the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def raise_fd_limit() -> Any:
    """Soft RLIMIT_NOFILE up to the hard limit: the connection cap, not the default 1024,
    should be what bounds connections."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
