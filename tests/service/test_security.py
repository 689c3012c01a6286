"""Access by API key, configured limits, overload, and bank names that try to escape."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from tests.service.conftest import CODEBOOK, app_client, npy
from vqsearch.client import AsyncClient, AuthenticationError, PermissionDeniedError

READ, ADMIN, ADMIN2 = "r-key", "a-key", "a-key-new"
Q = {"queries": CODEBOOK[:2].tolist(), "k": 1}


def _h(key: str | None) -> dict[str, str]:
    return {} if key is None else {"authorization": f"Bearer {key}"}


@pytest.fixture
async def secured(settings):
    s = settings.model_copy(update={"read_keys": READ, "admin_keys": f"{ADMIN}, {ADMIN2}"})
    async with app_client(s) as api:
        r = await api.put("/v1/banks/cb", json={"vectors": CODEBOOK.tolist()}, headers=_h(ADMIN))
        assert r.status_code == 201
        yield api


async def test_keys_and_roles(secured):
    """No key or an unknown key: 401; a read key reads but cannot write (403); both admin keys
    (rotation) may do everything; health and metrics stay open."""
    api = secured
    r = await api.post("/v1/banks/cb/search", json=Q)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert (await api.post("/v1/banks/cb/search", json=Q, headers=_h("nope"))).status_code == 401
    assert (
        await api.post("/v1/banks/cb/search", json=Q, headers={"authorization": READ})
    ).status_code == 401
    reads = [
        ("POST", "/v1/banks/cb/search", Q),
        ("POST", "/v1/banks/cb/nearest", {"queries": CODEBOOK[:2].tolist()}),
        ("POST", "/v1/banks/cb/decode", {"codes": [1, 2]}),
        ("GET", "/v1/banks/cb", None),
        ("GET", "/v1/banks", None),
        ("GET", "/v1/banks/cb/tradeoff", None),
    ]
    for method, path, body in reads:
        r = await api.request(method, path, json=body, headers=_h(READ))
        assert r.status_code == 200, (path, r.text)
    writes = [
        ("PUT", "/v1/banks/x", {"vectors": CODEBOOK[:3].tolist()}),
        ("POST", "/v1/banks/cb/vectors", {"vectors": CODEBOOK[:1].tolist()}),
        ("DELETE", "/v1/banks/cb/vectors", {"ids": [0]}),
        ("PUT", "/v1/banks/cb/index", {}),
        ("POST", "/v1/banks/cb/tradeoff", {}),
        ("DELETE", "/v1/banks/cb", None),
    ]
    for method, path, body in writes:
        r = await api.request(method, path, json=body, headers=_h(READ))
        assert r.status_code == 403 and "admin" in r.json()["detail"], path
    r = await api.post(
        "/v1/banks/cb/vectors", json={"vectors": CODEBOOK[:1].tolist()}, headers=_h(ADMIN2)
    )
    assert r.status_code == 200
    assert (await api.get("/healthz")).status_code == 200
    assert (await api.get("/metrics")).status_code == 200


async def test_private_metrics(settings):
    """With VQSEARCH_METRICS_PUBLIC=0, /metrics needs a key too."""
    s = settings.model_copy(update={"read_keys": READ, "metrics_public": False})
    async with app_client(s) as api:
        assert (await api.get("/metrics")).status_code == 401
        assert (await api.get("/metrics", headers=_h(READ))).status_code == 200


async def test_client_sends_key_and_maps_401_403(settings):
    """The client's api_key is sent as a Bearer token; 401 and 403 become their exceptions."""
    s = settings.model_copy(update={"read_keys": READ, "admin_keys": ADMIN})
    from vqsearch.service import create_app

    app = create_app(s)
    tr = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with AsyncClient("http://a", api_key=ADMIN, transport=tr) as admin:
            await admin.create_bank("cb", CODEBOOK)
        async with AsyncClient("http://a", api_key=READ, transport=tr) as reader:
            assert (await reader.search("cb", CODEBOOK[:1], k=1)).ids.tolist() == [[0]]
            with pytest.raises(PermissionDeniedError) as err:
                await reader.add("cb", CODEBOOK[:1])
            assert err.value.status == 403
        async with AsyncClient("http://a", transport=tr) as anonymous:
            with pytest.raises(AuthenticationError):
                await anonymous.get_bank("cb")


async def test_limits_name_themselves(settings):
    """d, bank size, bank count, queries per request and k limits answer 422 naming the limit."""
    s = settings.model_copy(
        update={"max_d": 8, "max_bank_vectors": 600, "max_banks": 2, "max_queries": 550, "max_k": 5}
    )
    async with app_client(s) as api:
        r = await api.put("/v1/banks/wide", json={"vectors": [[0.0] * 9]})
        assert r.status_code == 422 and "VQSEARCH_MAX_D" in r.json()["detail"]
        small = np.random.default_rng(0).standard_normal((500, 4)).astype(np.float32)
        assert (await api.put("/v1/banks/a", json={"vectors": small.tolist()})).status_code == 201
        r = await api.post(
            "/v1/banks/a/vectors",
            content=npy(small[:101]),
            headers={"content-type": "application/x-npy"},
        )
        assert r.status_code == 422 and "VQSEARCH_MAX_BANK_VECTORS" in r.json()["detail"]
        assert (await api.get("/v1/banks/a")).json()["count"] == 500
        assert (await api.put("/v1/banks/b", json={"d": 4})).status_code == 201
        r = await api.put("/v1/banks/c", json={"d": 4})
        assert r.status_code == 422 and "VQSEARCH_MAX_BANKS" in r.json()["detail"]
        many = np.concatenate([small, small[:51]])
        r = await api.post("/v1/banks/a/search", json={"queries": many.tolist()})
        assert r.status_code == 422 and "limit of 550" in r.json()["detail"]
        r = await api.post("/v1/banks/a/search", json={"queries": small[:1].tolist(), "k": 6})
        assert r.status_code == 422 and "limit of 5" in r.json()["detail"]


async def test_overload_answers_503_with_retry_after_at_once(settings):
    """Beyond VQSEARCH_MAX_INFLIGHT requests under way, the next gets 503 + Retry-After fast."""
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((20000, 64)).astype(np.float32)
    async with app_client(
        settings.model_copy(update={"max_inflight": 1, "max_body_bytes": 64 << 20})
    ) as api:
        await api.put(
            "/v1/banks/big", content=npy(xb), headers={"content-type": "application/x-npy"}
        )
        slow = asyncio.create_task(
            api.post(
                "/v1/banks/big/search?k=10",
                content=npy(xb),
                headers={"content-type": "application/x-npy"},
            )
        )
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await api.post("/v1/banks/big/search", json={"queries": xb[:1].tolist()})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and loop.time() - t0 < 0.5
        assert "VQSEARCH_MAX_INFLIGHT" in r.json()["detail"]
        assert (await api.get("/healthz")).status_code == 200  # health is always admitted
        assert (await slow).status_code == 200
        assert (
            await api.post("/v1/banks/big/search", json={"queries": xb[:1].tolist()})
        ).status_code == 200


@pytest.mark.parametrize(
    "name", ["..", ".hidden", "a..%2F..%2Fetc", "x" * 65, "semi;colon", "sp ace", "%00"]
)
async def test_bank_names_cannot_escape_the_data_dir(api, name, settings):
    """Names outside the safe pattern are refused (422 or no route) and create nothing."""
    r = await api.put(f"/v1/banks/{name}", json={"vectors": CODEBOOK[:2].tolist()})
    assert r.status_code in (404, 405, 422), r.text
    made = {p.name for p in (settings.data_dir / "banks").iterdir()}
    assert made == {"cb"} and not (settings.data_dir.parent / "etc").exists()
