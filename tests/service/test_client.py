"""The Python client: every route, chunking, torch input, errors, retries, no torch import."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from tests.conftest import brute_force
from tests.service.conftest import CODEBOOK
from vqsearch.client import (
    APIError,
    AsyncClient,
    Client,
    ConflictError,
    NotFoundError,
    PreconditionFailedError,
    ServiceUnavailableError,
    TransportError,
    UnprocessableError,
)
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
    assert (await client.health()) == {"status": "ok"}
    assert (await client.ready())["status"] == "ready"
    info = await client.get_bank("cb")
    assert info["count"] == 512 and [b["name"] for b in await client.list_banks()] == ["cb"]
    ids = await client.add("cb", CODEBOOK[:3] * 1.01, ids=[1000, 1001, 1002])
    assert ids.tolist() == [1000, 1001, 1002]
    assert await client.remove("cb", [1001]) == 1
    z = torch.from_numpy(CODEBOOK[[5, 9, 1000 - 1000]].reshape(1, 3, 16)).permute(
        0, 2, 1
    )  # (1, 16, 3)
    res = await client.nearest("cb", z, channel_axis=1, return_quantized=True, return_error=True)
    assert (
        res.codes.tolist() == [[5, 9, 0]]
        and res.version == (await client.get_bank("cb"))["version"]
    )
    np.testing.assert_array_equal(res.quantized, z.numpy())
    np.testing.assert_array_equal(res.errors, np.zeros((1, 3), np.float32))
    vec = await client.decode("cb", res.codes, channel_axis=1)
    np.testing.assert_array_equal(vec, z.numpy())
    await client.build_index("cb", "PQ8x4fs,RFlat")
    info = await client.wait_index("cb", timeout=60)
    assert info["index"]["state"] == "ready"
    I = (await client.search("cb", CODEBOOK[:20], k=1, mode="approx", k_factor=8)).ids
    assert (I[:, 0] == np.arange(20)).mean() >= 0.9
    await client.delete_bank("cb")
    with pytest.raises(NotFoundError) as err:
        await client.get_bank("cb")
    assert err.value.status == 404 and "cb" in err.value.body


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
                        c._array_call(
                            "/v1/banks/cb/vectors", {"vectors": CODEBOOK[:1]}, {}, lambda r: r
                        )
                    )
                return resp

            c.send = send_then_write  # type: ignore[method-assign]
            with pytest.raises(PreconditionFailedError):
                await c.search("cb", CODEBOOK[:6], k=1)


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
        assert c.health() == {"status": "ok"}
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
        "print(sorted(m for m in ('torch', 'faiss', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
