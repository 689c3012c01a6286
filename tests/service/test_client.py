"""The Python client: every route, chunking, torch input, errors, retries, no torch import."""

from __future__ import annotations

import dataclasses
import inspect
import io
import subprocess
import sys
import typing

import httpx
import numpy as np
import pytest
import torch

from tests.conftest import brute_force
from tests.service.conftest import CODEBOOK
from vqsearch import _wire_names as wire
from vqsearch.client import (
    APIError,
    AsyncClient,
    BankInfo,
    Client,
    ConflictError,
    Health,
    IndexInfo,
    IndexPhase,
    NearestResult,
    NotFoundError,
    PreconditionFailedError,
    ResponseFormatError,
    SearchResult,
    ServiceUnavailableError,
    SweepPhase,
    TradeoffJob,
    TradeoffPoint,
    TradeoffReport,
    TransportError,
    UnprocessableError,
    UsageSummary,
)
from vqsearch.client._core import Requests
from vqsearch.service import create_app


@pytest.fixture
async def client(settings):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        c = AsyncClient("http://app", transport=httpx.ASGITransport(app=app), chunk_size=7)
        async with c:
            await c.create_bank("cb", CODEBOOK)
            yield c


@pytest.mark.parametrize("binary", [True, False])
async def test_chunked_search_equals_one_request(settings, binary):
    """A batch split in chunks of 7 (sent concurrently) reassembles to the exact answer."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        tr = httpx.ASGITransport(app=app)
        async with AsyncClient("http://app", transport=tr, chunk_size=7, binary=binary) as c:
            await c.create_bank("cb", CODEBOOK)
            xq = np.random.default_rng(3).standard_normal((50, 16)).astype(np.float32)
            D, I = await c.search("cb", xq, k=4)
            Dr, Ir = brute_force(xq, CODEBOOK, 4, "l2")
            np.testing.assert_array_equal(I, Ir)
            np.testing.assert_allclose(D, Dr, rtol=1e-6)


async def test_every_route(client):
    """Create, info, list, add, remove, nearest, decode, index build and delete all work."""
    assert (await client.health()).status == "ok"
    assert (await client.ready()).status == "ready"
    info = await client.get_bank("cb")
    assert info.count == 512 and [b.name for b in await client.list_banks()] == ["cb"]
    ids = await client.add("cb", CODEBOOK[:3] * 1.01, ids=[1000, 1001, 1002])
    assert ids.tolist() == [1000, 1001, 1002]
    assert await client.remove("cb", [1001]) == 1
    z = torch.from_numpy(CODEBOOK[[5, 9, 1000 - 1000]].reshape(1, 3, 16)).permute(
        0, 2, 1
    )  # (1, 16, 3)
    res = await client.nearest("cb", z, channel_axis=1, return_quantized=True, return_error=True)
    assert (
        res.codes.tolist() == [[5, 9, 0]] and res.version == (await client.get_bank("cb")).version
    )
    np.testing.assert_array_equal(res.quantized, z.numpy())
    np.testing.assert_array_equal(res.errors, np.zeros((1, 3), np.float32))
    vec = await client.decode("cb", res.codes, channel_axis=1)
    np.testing.assert_array_equal(vec, z.numpy())
    await client.build_index("cb", "PQ8x4fs,RFlat")
    info = await client.wait_index("cb", timeout=60)
    assert info.index is not None and info.index.state == "ready"
    I = (await client.search("cb", CODEBOOK[:20], k=1, mode="approx", k_factor=8)).ids
    assert (I[:, 0] == np.arange(20)).mean() >= 0.9
    assert await client.delete_bank("cb") == "cb"
    with pytest.raises(NotFoundError) as err:
        await client.get_bank("cb")
    assert err.value.status == 404 and "cb" in err.value.body and err.value.request_id


async def test_errors_map_to_exceptions_with_status_and_body(client):
    """422, 409 and 412 arrive as their exception classes, keeping status and detail."""
    with pytest.raises(UnprocessableError, match="d=3") as err:
        await client.search("cb", np.zeros((2, 3), np.float32))
    assert err.value.status == 422 and isinstance(err.value, APIError)
    with pytest.raises(ConflictError):
        await client.create_bank("cb", CODEBOOK)
    with pytest.raises(PreconditionFailedError):
        await client.search("cb", CODEBOOK[:1], k=1, version="not-the-version")


async def test_chunks_are_pinned_to_the_first_chunks_version(settings):
    """If the bank changes between chunks, the call fails with 412 rather than mixing versions."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        tr = httpx.ASGITransport(app=app)
        async with AsyncClient("http://app", transport=tr, chunk_size=2, max_concurrency=1) as c:
            await c.create_bank("cb", CODEBOOK)
            real = c.send
            calls = 0

            async def send_then_write(call):
                nonlocal calls
                calls += 1
                resp = await real(call)
                if calls == 1:  # a write lands after the first chunk
                    await real(
                        c._requests._array_call(
                            "/v1/banks/cb/vectors", {"vectors": CODEBOOK[:1]}, {}, lambda r: r
                        )
                    )
                return resp

            c.send = send_then_write  # type: ignore[method-assign]
            with pytest.raises(PreconditionFailedError):
                await c.search("cb", CODEBOOK[:6], k=1)


async def test_a_large_add_goes_as_appends_in_order(settings, monkeypatch):
    """Vectors over ADD_CHUNK_BYTES are sent as several appends, one after another: the ids
    are those of one append, the rows land in order; if an append fails part-way, the error
    carries the ids of the rows that were added before it (and they are in the bank)."""
    monkeypatch.setattr("vqsearch.client._core.ADD_CHUNK_BYTES", 10 * 16 * 4)  # 10 rows
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        tr = httpx.ASGITransport(app=app)
        async with AsyncClient("http://app", transport=tr, max_concurrency=8) as c:
            await c.create_bank("b", d=16)
            posts = 0
            real = c.send

            async def count(call):
                nonlocal posts
                posts += call.method == "POST"
                return await real(call)

            c.send = count  # type: ignore[method-assign]
            ids = await c.add("b", CODEBOOK[:95])
            assert posts == 10 and ids.tolist() == list(range(95))
            np.testing.assert_array_equal(await c.decode("b", np.arange(95)), CODEBOOK[:95])
            mine = np.arange(1000, 1030)
            mine[25] = 3  # taken: the third append (rows 20..29) is refused whole
            with pytest.raises(ConflictError) as err:
                await c.add("b", CODEBOOK[100:130], ids=mine)
            assert err.value.added.tolist() == list(range(1000, 1020))
            assert (await c.get_bank("b")).count == 115
    answers = iter([{"ids": list(range(10))}, {"ids": list(range(10, 20))}, None])

    def handler(request: httpx.Request) -> httpx.Response:
        doc = next(answers)
        return (
            httpx.Response(409, json={"detail": "taken"})
            if doc is None
            else httpx.Response(200, json=doc)
        )

    with (
        Client("http://x", transport=httpx.MockTransport(handler), retries=0) as sync,
        pytest.raises(ConflictError) as err,
    ):
        sync.add("b", np.zeros((25, 16), np.float32))
    assert err.value.added.tolist() == list(range(20))


def _flaky(statuses: list[int], seen: list[str]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        status = statuses.pop(0) if statuses else 200
        if status == 503:
            return httpx.Response(503, headers={"retry-after": "0"}, json={"detail": "busy"})
        if status == 0:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"status": "ok"})

    return httpx.MockTransport(handler)


def test_sync_client_retries_idempotent_calls_on_503_and_connection_errors():
    """GETs are retried on 503 (honouring Retry-After) and refused connections, then succeed."""
    seen: list[str] = []
    with Client("http://x", transport=_flaky([503, 0, 503], seen), retries=3) as c:
        assert c.health().status == "ok"
    assert seen == ["GET"] * 4
    seen.clear()
    with (
        Client("http://x", transport=_flaky([503] * 5, seen), retries=2) as c,
        pytest.raises(ServiceUnavailableError),
    ):
        c.health()
    assert len(seen) == 3


async def test_appends_are_not_retried_after_a_503():
    """A non-idempotent append that got 503 is not sent again (it might have landed)."""
    seen: list[str] = []
    async with AsyncClient("http://x", transport=_flaky([503, 503], seen), retries=3) as c:
        with pytest.raises(ServiceUnavailableError):
            await c.add("b", np.zeros((1, 4), np.float32))
    assert seen == ["POST"]


def test_connection_refused_is_a_transport_error():
    """No server at all surfaces as TransportError (from the httpx error)."""
    with (
        Client("http://127.0.0.1:9", retries=1, timeout=2) as c,
        pytest.raises(TransportError) as err,
    ):
        c.health()
    assert isinstance(err.value.__cause__, httpx.TransportError)


def test_client_imports_neither_torch_nor_faiss():
    """`import vqsearch.client` pulls in httpx and numpy only."""
    code = (
        "import sys, vqsearch.client; "
        "print(sorted(m for m in ('torch', 'faiss', 'fastapi', 'starlette', 'pydantic_settings')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_wire_names_import_only_the_standard_library():
    """`vqsearch._wire_names`, shared by client and server, depends on nothing outside the
    standard library."""
    code = (
        "import sys; before = set(sys.modules); import vqsearch._wire_names; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}"
        " - set(sys.stdlib_module_names) - {'vqsearch'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_wire_names_are_the_servers(settings):
    """The shared names are the ones the server answers to: a route for every path the client
    builds, its media types and headers."""
    app = create_app(settings)
    routes = set(app.openapi()["paths"])
    bank_routes = [getattr(wire, n) for n in wire.__all__ if n.endswith("_ROUTE")]
    named = {wire.HEALTH_PATH, wire.READY_PATH, wire.METRICS_PATH, wire.API_PREFIX}
    named |= {wire.bank_path("{name}")} | {wire.bank_path("{name}", r) for r in bank_routes}
    assert named <= routes, named - routes
    async with app.router.lifespan_context(app):
        tr = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=tr, base_url="http://app") as http:
            body = {"content-type": wire.JSON}
            r = await http.put(wire.bank_path("cb"), json={"vectors": CODEBOOK.tolist()})
            version = r.headers[wire.VERSION_HEADER]
            headers = {
                wire.CONTENT_TYPE_HEADER: wire.OCTET_STREAM,
                wire.ACCEPT_HEADER: wire.NPZ,
                wire.REQUEST_ID_HEADER: "req-1",
                wire.IF_MATCH_HEADER: version,
            }
            search = wire.bank_path("cb", wire.SEARCH_ROUTE)
            r = await http.post(search, content=_npy(CODEBOOK[:2]), headers=headers)
            assert r.status_code == 200 and r.headers["content-type"] == wire.NPZ
            assert r.headers[wire.SETTING_HEADER] == "exact"
            assert r.headers[wire.VERSION_HEADER] == version
            assert r.headers[wire.REQUEST_ID_HEADER] == "req-1"
            r = await http.post(
                search, json={wire.QUERIES_FIELD: CODEBOOK[:2].tolist()}, headers=body
            )
            assert r.headers["content-type"] == wire.JSON
            assert set(r.json()) >= {wire.IDS_FIELD, wire.DISTANCES_FIELD}
            stale = {wire.IF_MATCH_HEADER: "0-0", wire.CONTENT_TYPE_HEADER: wire.NPY}
            r = await http.post(search, content=_npy(CODEBOOK[:1]), headers=stale)
            assert r.status_code == 412 and r.headers[wire.VERSION_HEADER] == version


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _modelled(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"raw"}


async def test_results_are_typed_and_model_every_field_the_server_sends(client):
    """Bank info, index state and query results are typed, their fields equal to the JSON the
    server sent (kept as `raw`); every field it sends is modelled."""
    http = client._http  # the same app, read without the client's parsing
    info = await client.get_bank("cb")
    doc = (await http.get("/v1/banks/cb")).json()
    assert isinstance(info, BankInfo) and info.raw == doc and set(doc) == _modelled(BankInfo)
    for name in _modelled(BankInfo) - {"index", "tradeoff", "usage"}:
        assert getattr(info, name) == doc[name], name
    assert (info.name, info.d, info.count, info.max_id) == ("cb", 16, 512, 511)
    assert info.index is None and info.query_sample is None
    assert isinstance(info.usage, UsageSummary) and info.usage.raw == doc["usage"]
    assert set(doc["usage"]) == _modelled(UsageSummary) and info.usage.dead_codes == 512
    for name in _modelled(UsageSummary):
        assert getattr(info.usage, name) == doc["usage"][name], name
    assert isinstance(info.tradeoff, TradeoffJob) and info.tradeoff.state is SweepPhase.NONE
    assert info.tradeoff.measured is False and info.tradeoff.raw == doc["tradeoff"]
    assert info["count"] == 512 and "version" in info  # the JSON, for code that read dicts

    started = await client.build_index("cb", "IVF8,Flat")
    assert isinstance(started, IndexInfo) and started.spec == "IVF8,Flat"
    assert isinstance(started.state, IndexPhase) and started.state in list(IndexPhase)
    ready = await client.wait_index("cb", timeout=60)
    doc = (await http.get("/v1/banks/cb")).json()
    index = ready.index
    assert isinstance(ready, BankInfo) and isinstance(index, IndexInfo)
    assert index.state is IndexPhase.READY and index.ready and index.raw == doc["index"]
    assert set(doc["index"]) == _modelled(IndexInfo)
    for name in _modelled(IndexInfo):
        assert getattr(index, name) == doc["index"][name], name
    assert (index.nlist, index.ntotal, index.bank_version) == (8, 512, ready.version)
    assert isinstance(index.build_seconds, float) and isinstance(index.nprobe, int)

    res = await client.search("cb", CODEBOOK[:3], k=2)
    assert isinstance(res, SearchResult) and res.ids.dtype == np.int64 and res.ids.shape == (3, 2)
    assert res.distances.dtype == np.float32 and res.ids[:, 0].tolist() == [0, 1, 2]
    assert res.version == ready.version and res.setting == "exact"
    approx = await client.search("cb", CODEBOOK[:3], k=2, mode="approx", nprobe=2)
    assert approx.setting == "IVF8,Flat;nprobe=2;k_factor=4.0" and approx.ids.dtype == np.int64
    near = await client.nearest("cb", CODEBOOK[:4], return_error=True, codes_dtype="int16")
    assert isinstance(near, NearestResult) and near.codes.tolist() == [0, 1, 2, 3]
    assert near.codes.dtype == np.int16 and near.errors is not None and near.quantized is None
    assert near.errors.dtype == np.float32 and near.setting == "exact"
    assert near.version == ready.version


async def test_tradeoff_results_are_typed(client):
    """The sweep's job and report are typed; points keep every measured field, per batch size
    keyed by int."""
    job = await client.tradeoff("cb", batch_sizes=[1, 8], min_seconds=0.0, n_queries=30)
    assert isinstance(job, TradeoffJob) and job.state in (SweepPhase.QUEUED, SweepPhase.BUILDING)
    done = await client.wait_tradeoff("cb", timeout=120)
    doc = (await client._http.get("/v1/banks/cb/tradeoff")).json()
    assert done.state is SweepPhase.DONE and done.progress == 1.0 and done.raw == doc
    report = done.report
    assert isinstance(report, TradeoffReport) and report.raw == doc["report"]
    assert set(doc["report"]) == _modelled(TradeoffReport) | {"machine"}
    for name in _modelled(TradeoffReport) - {"points"}:
        assert getattr(report, name) == doc["report"][name], name
    assert (report.bank, report.n_queries, report.primary_batch) == ("cb", 30, 1)
    assert all(isinstance(p, TradeoffPoint) for p in report.points) and report.pareto
    assert [p.spec for p in report.points] == [p["spec"] for p in doc["report"]["points"]]
    first, sent = report.points[0], doc["report"]["points"][0]
    assert first.spec == "exact" and set(sent) == _modelled(TradeoffPoint)
    assert set(first.qps) == {1, 8} and first.qps[8] == sent["qps"]["8"]
    assert first.p99_ms[1] == sent["p99_ms"]["1"] and first.recall_1_at_1 == 1.0
    info = await client.get_bank("cb")
    assert info.tradeoff is not None and info.tradeoff.measured is True
    assert info.index is not None and info.index.spec == report.index_spec


def _answering(doc: object) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(200, json=doc))


def test_answers_of_a_newer_or_older_server_still_read():
    """Unknown fields are ignored (kept in `raw`), an unknown state is a value of the enum
    outside its members, and fields an older server did not send are None."""
    newer = {
        "name": "b",
        "d": 4,
        "count": 2,
        "metric": "l2",
        "version": "abc-3",
        "replicas": 3,
        "index": {"spec": "IVF4,Flat", "state": "compacting", "progress": 0.5, "eta": 9},
        "tradeoff": {"state": "paused", "progress": 0.25, "measured": False},
    }
    with Client("http://x", transport=_answering(newer)) as c:
        info = c.get_bank("b")
    assert (info.name, info.count, info.version, info.bytes, info.usage) == (
        "b",
        2,
        "abc-3",
        None,
        None,
    )
    assert info["replicas"] == 3 and info.raw == newer
    index = info.index
    assert index is not None and index.state == "compacting" and not index.ready
    assert isinstance(index.state, IndexPhase) and index.state not in list(IndexPhase)
    assert index.raw["eta"] == 9 and index.nlist is None and str(index.state) == "compacting"
    assert info.tradeoff is not None and info.tradeoff.state == "paused"
    assert isinstance(info.tradeoff.state, SweepPhase) and info.tradeoff.progress == 0.25
    with Client("http://x", transport=_answering({"status": "ok", "uptime": 5})) as c:
        health = c.health()
    assert isinstance(health, Health) and health.status == "ok" and health.banks is None
    older = {k: newer[k] for k in ("name", "d", "count", "metric", "version")}
    with Client("http://x", transport=_answering(older)) as c:
        info = c.get_bank("b")
    assert info.index is None and info.tradeoff is None and info.generation is None


@pytest.mark.parametrize("answer", [{"name": "b", "d": 4}, ["b"], {"name": "b", "d": "four"}])
def test_an_answer_the_client_cannot_read_is_a_client_error(answer):
    """A 200 without a field the client needs, or of another shape, is a ResponseFormatError
    naming the call (a VQSearchClientError like every other failure)."""
    with (
        Client("http://x", transport=_answering(answer)) as c,
        pytest.raises(ResponseFormatError, match="GET /v1/banks/b"),
    ):
        c.get_bank("b")


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_both_clients_have_the_same_typed_methods():
    """Client and AsyncClient have the same methods with the same parameters (those of the
    route's plan in `Requests`), each returning a concrete type, not Any."""
    assert _public(Client) - {"close"} == _public(AsyncClient) - {"aclose"}
    for name in _public(Client) - {"close"}:
        sync, async_ = getattr(Client, name), getattr(AsyncClient, name)
        assert inspect.signature(sync) == inspect.signature(async_), name
        assert inspect.iscoroutinefunction(async_) and not inspect.iscoroutinefunction(sync)
        returns = typing.get_type_hints(sync)["return"]
        assert returns is not typing.Any and typing.get_type_hints(async_)["return"] == returns
    for name in _public(Requests) - {"binary", "chunk_size"}:
        plan = list(inspect.signature(getattr(Requests, name)).parameters.values())
        assert list(inspect.signature(getattr(Client, name)).parameters.values()) == plan, name
