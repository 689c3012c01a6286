"""Operations in-process: Prometheus metrics, request ids, JSON access logs, code usage."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time

import numpy as np
import pytest
from opentelemetry import trace

from tests.service.conftest import CODEBOOK, app_client
from vqsearch.service import _observe
from vqsearch.service._observe import JsonFormatter
from vqsearch.service._sampling import Usage


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample `name` whose labels include `labels`."""
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] == name:
            got = dict(re.findall(r'(\w+)="([^"]*)"', head))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(value)
    raise AssertionError(f"{name} {labels} not in metrics")


async def test_metrics_count_requests_batches_rows_and_banks(api):
    """/metrics reports requests by route and status, batch sizes, rows searched, bank sizes."""
    await api.post("/v1/banks/cb/search", json={"queries": CODEBOOK[:5].tolist(), "k": 2})
    await api.post("/v1/banks/cb/search", json={"queries": [[0.0] * 3]})
    text = (await api.get("/metrics")).text
    route = "/v1/banks/{name}/search"
    assert _metric(text, "vqsearch_requests_total", route=route, status="200") == 1
    assert _metric(text, "vqsearch_requests_total", route=route, status="422") == 1
    assert _metric(text, "vqsearch_request_seconds_count", route=route) == 2
    assert _metric(text, "vqsearch_search_batch_size_sum", route=route) == 5
    assert _metric(text, "vqsearch_rows_searched_total", bank="cb", setting="exact") == 5
    assert _metric(text, "vqsearch_bank_vectors", bank="cb") == 512
    assert _metric(text, "vqsearch_bank_bytes", bank="cb") >= CODEBOOK.nbytes


async def test_request_id_is_echoed_or_made(api):
    """A given X-Request-ID comes back unchanged; without one the server makes one."""
    r = await api.get("/healthz", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len((await api.get("/healthz")).headers["x-request-id"]) == 32


async def test_one_json_log_line_per_request(api, caplog):
    """Each request logs one line with id, route, bank, status, duration and rows."""
    with caplog.at_level(logging.INFO, logger="vqsearch.access"):
        await api.post(
            "/v1/banks/cb/nearest",
            json={"queries": CODEBOOK[:7].tolist()},
            headers={"x-request-id": "r1"},
        )
    recs = [r for r in caplog.records if r.name == "vqsearch.access"]
    assert len(recs) == 1
    doc = json.loads(JsonFormatter().format(recs[0]))
    assert doc["request_id"] == "r1" and doc["route"] == "/v1/banks/{name}/nearest"
    assert (doc["bank"], doc["status"], doc["rows"]) == ("cb", 200, 7) and doc["duration_ms"] > 0


async def test_code_usage_perplexity_and_dead_codes(api):
    """Codes served by nearest are counted: perplexity and dead codes match a hand count."""
    codes = np.array([0, 0, 1, 2, 2, 2, 3, 3])
    await api.post("/v1/banks/cb/nearest", json={"queries": CODEBOOK[codes].tolist()})
    u = (await api.get("/v1/banks/cb/usage")).json()
    assert u["ids"] == [0, 1, 2, 3] and u["counts"] == [2, 1, 3, 2]
    p = np.array([2, 1, 3, 2]) / 8
    assert abs(u["perplexity"] - np.exp(-(p * np.log(p)).sum())) < 1e-9
    assert u["dead_codes"] == 512 - 4
    assert (await api.get("/v1/banks/cb")).json()["usage"]["dead_codes"] == 508
    text = (await api.get("/metrics")).text
    assert _metric(text, "vqsearch_dead_codes", bank="cb") == 508


def test_usage_window_keeps_the_last_codes_across_wraps():
    """The window holds exactly the last `window` codes, whether a call wraps it or not."""
    usage = Usage(5)
    served: list[int] = []
    for codes in ([1, 2], [3], [4, 5, 6], [7], list(range(10, 22)), [30, 31]):
        usage.record(np.array(codes))
        served += codes
        ids, counts = usage.counts()
        want, n = np.unique(served[-5:], return_counts=True)
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_array_equal(counts, n)
    assert usage.served == len(served)


class _RecordingProvider(trace.TracerProvider):
    """A tracer provider that counts the tracers asked of it."""

    def __init__(self) -> None:
        self.asked = 0

    def get_tracer(self, *args: object, **kwargs: object) -> trace.Tracer:
        self.asked += 1
        return trace.NoOpTracer()


@pytest.mark.parametrize("otel", [False, True])
async def test_opentelemetry_only_when_asked(settings, monkeypatch, otel):
    """VQSEARCH_OTEL=1 hands requests to a configured OpenTelemetry provider; by default the
    app never consults one."""
    provider = _RecordingProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    async with app_client(settings.model_copy(update={"otel": otel})) as api:
        assert (await api.get("/healthz")).status_code == 200
    assert (provider.asked > 0) == otel


async def test_free_heap_pages_go_back_to_the_os_periodically(monkeypatch):
    """The trimmer calls malloc_trim on a schedule until it is cancelled."""
    calls: list[float] = []
    real = _observe.trim_heaps
    monkeypatch.setattr(_observe, "trim_heaps", lambda: calls.append(time.monotonic()))
    task = asyncio.create_task(_observe.trim_periodically(0.01))
    await asyncio.sleep(0.2)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    n = len(calls)
    assert n >= 3
    await asyncio.sleep(0.05)
    assert len(calls) == n  # stopped
    real()  # glibc's malloc_trim itself: harmless at any time
