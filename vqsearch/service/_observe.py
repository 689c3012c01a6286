"""Operations: Prometheus metrics, one JSON log line per request, request ids, code usage.

Metrics live in a registry of the app's own (several apps in one process do not collide).
Per-bank figures are read at scrape time, so they are never stale.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vqsearch._wire_names import REQUEST_ID_HEADER

from ._registry import Registry
from ._setting import Setting

access_log = logging.getLogger("vqsearch.access")
REQUEST_ID = REQUEST_ID_HEADER.lower()


TRIM_EVERY_S = 1.0  # `trim_periodically`: malloc_trim took 4-16 ms on a 500 MB server


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc: nothing to tune


def return_freed_memory() -> None:
    """glibc keeps freed score tiles in per-thread heaps, so a server answering from dozens of
    threads grows its RSS for minutes. Here: at most 4 heaps; allocations from 9 MiB up mmapped
    and unmapped on free (a scan's buffers are 8 MiB and stay below: they are reused); each
    heap trimmed once 32 MiB at its top are free; and every TRIM_EVERY_S `trim_periodically`
    gives back the free pages inside the heaps.

    Why not unmap sooner: every freed page then faults in again on the next use. Trimming at
    every free makes each sub-MiB re-rank chunk fault in, and a lower mmap threshold the int8
    scan's per-tile oneDNN buffers (`vqsearch/index/_int8.py`), both slower. Without the
    periodic trim the heaps keep growing under `bench/load.py`; with it the server holds no
    more after a run than after its warm-up (`bench/results/load.md`)."""
    libc = _libc()
    if libc is None:
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_mmap_threshold, 9 << 20)
    libc.mallopt(m_trim_threshold, 32 << 20)
    libc.mallopt(m_arena_max, 4)


def trim_heaps() -> None:
    """Give the OS the whole free pages inside glibc's heaps (malloc_trim(0)), not only those
    at their top."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


async def trim_periodically(every: float = TRIM_EVERY_S) -> None:
    """`trim_heaps` every `every` seconds, on a worker thread, until cancelled."""
    while True:
        await asyncio.sleep(every)
        await asyncio.to_thread(trim_heaps)


class JsonFormatter(logging.Formatter):
    """Each record as one JSON object: time, level, logger, message, any `fields`, and the
    traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = name != "uvicorn.access"  # we log requests ourselves


class _BankCollector(Collector):
    def __init__(self, registry: Callable[[], Registry | None]) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        registry = self.registry()
        entries = list(registry.entries.items()) if registry is not None else []
        fams = {
            "vectors": GaugeMetricFamily("vqsearch_bank_vectors", "live vectors", labels=["bank"]),
            "bytes": GaugeMetricFamily(
                "vqsearch_bank_bytes", "bytes of vectors and ids", labels=["bank"]
            ),
            "build": GaugeMetricFamily("vqsearch_index_build_progress", "0..1", labels=["bank"]),
            "ppl": GaugeMetricFamily(
                "vqsearch_code_perplexity", "over the usage window", labels=["bank"]
            ),
            "dead": GaugeMetricFamily(
                "vqsearch_dead_codes", "codes unused in the window", labels=["bank"]
            ),
        }
        for name, e in entries:
            fams["vectors"].add_metric([name], e.bank.ntotal)
            fams["bytes"].add_metric([name], e.bank.nbytes)
            if e.build is not None:
                fams["build"].add_metric([name], e.build.progress)
            if e.usage is not None and e.usage.served:
                s = e.usage.summary(e.bank.ids())
                fams["ppl"].add_metric([name], s["perplexity"])
                fams["dead"].add_metric([name], s["dead_codes"])
        yield from fams.values()


class Metrics:
    def __init__(
        self, registry: Callable[[], Registry | None], queued_rows: Callable[[], int] = lambda: 0
    ) -> None:
        self.prom = CollectorRegistry()
        self.requests = Counter(
            "vqsearch_requests", "HTTP requests", ["route", "method", "status"], registry=self.prom
        )
        self.latency = Histogram(
            "vqsearch_request_seconds",
            "HTTP request latency",
            ["route", "method"],
            registry=self.prom,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.batch = Histogram(
            "vqsearch_search_batch_size",
            "vectors per search request",
            ["route"],
            registry=self.prom,
            buckets=tuple(4.0**i for i in range(11)),
        )
        self.rows = Counter(
            "vqsearch_rows_searched",
            "query vectors searched (rate: rows/s)",
            ["bank", "setting"],
            registry=self.prom,
        )
        self.inflight = Gauge(
            "vqsearch_inflight_requests", "requests being served", registry=self.prom
        )
        queue = Gauge(
            "vqsearch_batch_queue_rows",
            "query rows waiting to be micro-batched",
            registry=self.prom,
        )
        queue.set_function(queued_rows)
        self.prom.register(_BankCollector(registry))
        self._children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, kept: labels() takes a lock and builds its key on every
        call, and a labelled child is never dropped anyway."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def searched(self, route: str, bank: str, setting: Setting, rows: int) -> None:
        """One search request of `rows` vectors answered by `setting`."""
        self.child(self.batch, route).observe(rows)
        self.child(self.rows, bank, setting.spec).inc(rows)


class ObserveMiddleware:
    """Request id in and out, one JSON access line, and request metrics; pure ASGI."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        # 128 random bits, as uuid4().hex gives, without building a UUID (5% of a small request)
        rid = headers.get(REQUEST_ID.encode(), b"").decode("latin-1")[:128] or os.urandom(16).hex()
        # 499 (client closed request) unless a response started: the admission middleware
        # answers nothing to a client that went away while sending its body
        status, t0 = 499, time.perf_counter()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID.encode(), rid.encode()),
                ]
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = 500 if status == 499 else status
            raise
        finally:
            self.metrics.inflight.dec()
            seconds = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", "unmatched")
            m = self.metrics
            m.child(m.requests, route, scope["method"], str(status)).inc()
            m.child(m.latency, route, scope["method"]).observe(seconds)
            if access_log.isEnabledFor(logging.INFO):  # not built for a line that is dropped
                state = scope.get("state") or {}
                fields = {
                    "request_id": rid,
                    "method": scope["method"],
                    "route": route,
                    "path": scope["path"],
                    "bank": (scope.get("path_params") or {}).get("name"),
                    "status": status,
                    "duration_ms": round(1e3 * seconds, 3),
                    "rows": state.get("rows"),
                }
                access_log.info("request", extra={"fields": fields})
