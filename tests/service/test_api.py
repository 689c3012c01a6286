"""HTTP API in-process: routes, both wire formats, versions, and every error status."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import pytest
from fastapi import APIRouter, Depends, HTTPException, Request

from tests.conftest import brute_force
from tests.service.conftest import CODEBOOK, app_client, npy
from vqsearch.index import Bank
from vqsearch.service import _deps, create_app
from vqsearch.service._deps import EntryDep, EntryRoute, Reads
from vqsearch.service.routes import query

NPY, NPZ = "application/x-npy", "application/x-npz"


def _npz(content: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(content), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


async def test_create_list_info_and_version_header(api):
    """A created bank is listed with d, count, metric, bytes and a version header."""
    info = await api.get("/v1/banks/cb")
    assert info.status_code == 200
    body = info.json()
    assert (body["d"], body["count"], body["metric"]) == (16, 512, "l2")
    assert body["bytes"] >= CODEBOOK.nbytes and body["index"] is None
    assert info.headers["x-vqsearch-bank-version"] == body["version"]
    assert [b["name"] for b in (await api.get("/v1/banks")).json()] == ["cb"]
    again = await api.put("/v1/banks/cb", json={"vectors": CODEBOOK.tolist()})
    assert again.status_code == 409 and "exists" in again.json()["detail"]


async def test_search_json_and_binary_agree_and_are_exact(api, rng):
    """Top-k over HTTP equals float64 brute force, and JSON and .npz give identical arrays."""
    xq = rng.standard_normal((40, 16)).astype(np.float32)
    j = (await api.post("/v1/banks/cb/search", json={"queries": xq.tolist(), "k": 5})).json()
    b = await api.post("/v1/banks/cb/search?k=5", content=npy(xq), headers={"content-type": NPY})
    assert b.headers["content-type"] == NPZ
    arrays = _npz(b.content)
    np.testing.assert_array_equal(arrays["ids"], j["ids"])
    np.testing.assert_array_equal(arrays["distances"], np.float32(j["distances"]))
    Dr, Ir = brute_force(xq, CODEBOOK, 5, "l2")
    np.testing.assert_array_equal(arrays["ids"], Ir)
    np.testing.assert_allclose(arrays["distances"], Dr, rtol=1e-6)
    as_json = await api.post(
        "/v1/banks/cb/search?k=5",
        content=npy(xq),
        headers={"content-type": NPY, "accept": "application/json"},
    )
    assert as_json.json()["ids"] == j["ids"]


@pytest.mark.parametrize("binary", [False, True])
async def test_tokenize_latents_like_a_vector_quantizer(api, rng, binary):
    """nearest on (B, C, H, W) with channel_axis=1 gives the VQGAN argmin codes (B, H, W),
    z_q in the input layout and ||z - z_q||^2; decode inverts it."""
    z = rng.standard_normal((2, 16, 5, 3)).astype(np.float32)
    flat = np.moveaxis(z, 1, -1).reshape(-1, 16).astype(np.float64)
    e = CODEBOOK.astype(np.float64)
    dist = (flat**2).sum(1, keepdims=True) + (e**2).sum(1) - 2 * flat @ e.T
    expect = dist.argmin(1).reshape(2, 5, 3)
    params = "channel_axis=1&return_quantized=true&return_error=true"
    if binary:
        r = await api.post(
            f"/v1/banks/cb/nearest?{params}", content=npy(z), headers={"content-type": NPY}
        )
        out = _npz(r.content)
    else:
        r = await api.post(f"/v1/banks/cb/nearest?{params}", json={"queries": z.tolist()})
        out = {k: np.asarray(v) for k, v in r.json().items() if k != "mode"}
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(out["codes"], expect)
    zq = np.moveaxis(CODEBOOK[expect], -1, 1)
    np.testing.assert_array_equal(np.float32(out["quantized"]), zq)
    np.testing.assert_allclose(out["errors"], ((z - zq) ** 2).sum(1), rtol=1e-5)
    dec = await api.post(
        "/v1/banks/cb/decode?channel_axis=1",
        content=npy(out["codes"].astype(np.int64)),
        headers={"content-type": NPY},
    )
    np.testing.assert_array_equal(np.load(io.BytesIO(dec.content)), zq)


async def test_nearest_keeps_leading_shape_and_compact_codes(api, rng):
    """(..., d) queries give (...) codes; codes_dtype=int16 is honoured when it fits."""
    z = rng.standard_normal((3, 4, 16)).astype(np.float32)
    r = await api.post(
        "/v1/banks/cb/nearest?codes_dtype=int16", content=npy(z), headers={"content-type": NPY}
    )
    codes = np.load(io.BytesIO(r.content))
    assert codes.shape == (3, 4) and codes.dtype == np.int16
    np.testing.assert_array_equal(
        codes, brute_force(z.reshape(-1, 16), CODEBOOK, 1, "l2")[1].reshape(3, 4)
    )


async def test_compact_codes_refused_when_ids_do_not_fit(api, rng):
    """codes_dtype=int16 is a 422 when the nearest id is beyond int16."""
    v = rng.standard_normal((1, 16)).astype(np.float32)
    await api.post("/v1/banks/cb/vectors", json={"vectors": v.tolist(), "ids": [40000]})
    r = await api.post("/v1/banks/cb/nearest?codes_dtype=int16", json={"queries": v.tolist()})
    assert r.status_code == 422 and "int16" in r.json()["detail"]


async def test_append_remove_and_if_match(api, rng):
    """Appends continue the ids, every write changes the version, and a pinned version gets 412."""
    v0 = (await api.get("/v1/banks/cb")).headers["x-vqsearch-bank-version"]
    pinned = await api.post(
        "/v1/banks/cb/search",
        json={"queries": CODEBOOK[:1].tolist(), "k": 1},
        headers={"if-match": v0},
    )
    assert pinned.status_code == 200
    v = rng.standard_normal((3, 16)).astype(np.float32)
    r = await api.post("/v1/banks/cb/vectors", json={"vectors": v.tolist()})
    assert r.json()["ids"] == [512, 513, 514]
    v1 = r.headers["x-vqsearch-bank-version"]
    assert v1 != v0
    stale = await api.post(
        "/v1/banks/cb/search", json={"queries": v.tolist(), "k": 1}, headers={"if-match": v0}
    )
    assert stale.status_code == 412 and stale.headers["x-vqsearch-bank-version"] == v1
    dup = await api.post("/v1/banks/cb/vectors", json={"vectors": v[:1].tolist(), "ids": [3]})
    assert dup.status_code == 409 and "3" in dup.json()["detail"]
    gone = await api.request("DELETE", "/v1/banks/cb/vectors", json={"ids": [512, 513]})
    assert gone.json() == {"removed": 2}
    assert (await api.get("/v1/banks/cb")).json()["count"] == 513
    missing = await api.request("DELETE", "/v1/banks/cb/vectors", json={"ids": [512]})
    assert missing.status_code == 422 and "512" in missing.json()["detail"]


async def test_delete_bank(api):
    """A deleted bank is gone from the list and its routes answer 404."""
    assert (await api.delete("/v1/banks/cb")).json() == {"deleted": "cb"}
    assert (await api.get("/v1/banks/cb")).status_code == 404
    assert (await api.get("/v1/banks")).json() == []


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "words"),
    [
        ("/v1/banks/nope/search", {"json": {"queries": [[0.0] * 16]}}, 404, "nope"),
        ("/v1/banks/cb/search", {"json": {"queries": [[0.0] * 15]}}, 422, "d=15"),
        ("/v1/banks/cb/search", {"json": {"queries": [0.0] * 16}}, 422, "2-D"),
        ("/v1/banks/cb/search", {"json": {"queries": [[0.0] * 15, [1.0]]}}, 422, "rectangular"),
        ("/v1/banks/cb/search", {"json": {"queries": [["a"] * 16]}}, 422, "dtype"),
        (
            "/v1/banks/cb/search",
            {
                "content": npy(np.full((1, 16), np.nan, np.float32)),
                "headers": {"content-type": NPY},
            },
            422,
            "NaN",
        ),
        ("/v1/banks/cb/search", {"json": {"queries": [[0.0] * 16], "k": 0}}, 422, "k"),
        ("/v1/banks/cb/search", {"json": {"queries": [[0.0] * 16], "k": 513}}, 422, "k=513"),
        ("/v1/banks/cb/search", {"json": {"queries": [[0.0] * 16], "mode": "fast"}}, 422, "mode"),
        ("/v1/banks/cb/search", {"json": {"k": 1}}, 422, "queries"),
        ("/v1/banks/cb/search", {"json": {"queries": [[0.0] * 16], "wrong": 1}}, 422, "wrong"),
        ("/v1/banks/cb/search?k=0", {"json": {"queries": [[0.0] * 16]}}, 422, "k"),
        ("/v1/banks/cb/search?bogus=1", {"json": {"queries": [[0.0] * 16]}}, 422, "bogus"),
        (
            "/v1/banks/cb/nearest?codes_dtype=int8",
            {"json": {"queries": [[0.0] * 16]}},
            422,
            "int16",
        ),
        ("/v1/banks/cb/decode?channel_axis=x", {"json": {"codes": [1]}}, 422, "channel_axis"),
        (
            "/v1/banks/cb/search",
            {"content": b"x", "headers": {"content-type": "text/plain"}},
            415,
            "text/plain",
        ),
        (
            "/v1/banks/cb/search",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "JSON",
        ),
        (
            "/v1/banks/cb/search",
            {"content": b"\x93NUMPY garbage", "headers": {"content-type": NPY}},
            400,
            ".npy",
        ),
        (
            "/v1/banks/cb/search",
            {"content": b"PK\x03\x04 broken", "headers": {"content-type": NPZ}},
            400,
            ".npz",
        ),
        ("/v1/banks/cb/decode", {"json": {"codes": [1, 99999]}}, 422, "99999"),
        ("/v1/banks/cb/decode", {"json": {"codes": [1.5]}}, 422, "integers"),
        (
            "/v1/banks/cb/nearest?channel_axis=5",
            {"json": {"queries": [[0.0] * 16]}},
            422,
            "channel_axis",
        ),
        ("/v1/banks/cb/vectors", {"json": {"vectors": [[0.0] * 16], "ids": [-4]}}, 422, ">= 0"),
        ("/v1/banks/..secret/search", {"json": {"queries": [[0.0] * 16]}}, 422, "pattern"),
    ],
)
async def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(
    api, path, kwargs, status, words
):
    """Each bad request gets its status and a detail naming the problem; then all still works."""
    r = await api.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert words.lower() in str(r.json()["detail"]).lower()
    ok = await api.post("/v1/banks/cb/search", json={"queries": CODEBOOK[:2].tolist(), "k": 1})
    assert ok.status_code == 200 and ok.json()["ids"] == [[0], [1]]


async def test_body_over_limit_is_413(settings):
    """A body over VQSEARCH_MAX_BODY_BYTES is refused with 413 before it is read."""
    small = settings.model_copy(update={"max_body_bytes": 1000})
    async with app_client(small) as client:
        r = await client.put(
            "/v1/banks/x",
            content=npy(np.zeros((100, 16), np.float32)),
            headers={"content-type": NPY},
        )
        assert r.status_code == 413 and "1000" in r.json()["detail"]


async def test_pickles_are_never_loaded(api):
    """An object-dtype .npy (a pickle inside) is refused with 400, not unpickled."""
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    r = await api.post("/v1/banks/cb/search", content=buf.getvalue(), headers={"content-type": NPY})
    assert r.status_code == 400 and "pickle" in r.json()["detail"].lower()


async def _wait_index(api: httpx.AsyncClient, name: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = (await api.get(f"/v1/banks/{name}")).json()["index"]
        if info["state"] in ("ready", "failed"):
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"index not ready: {info}")


async def test_index_build_approx_search_and_staleness(api, rng):
    """PUT index answers 202; approx answers 409 until ready, then serves; a write makes the
    index stale and the automatic rebuild brings it back."""
    assert (
        await api.post("/v1/banks/cb/search?mode=approx", json={"queries": CODEBOOK[:1].tolist()})
    ).status_code == 409
    bad = await api.put("/v1/banks/cb/index", json={"spec": "Nonsense99"})
    assert bad.status_code == 422 and "Nonsense99" in bad.json()["detail"]
    r = await api.put("/v1/banks/cb/index", json={"spec": "PQ8x4fs,RFlat"})
    assert r.status_code == 202 and r.json()["state"] in ("queued", "training", "saving", "ready")
    info = await _wait_index(api, "cb")
    assert info["state"] == "ready" and info["spec"] == "PQ8x4fs,RFlat"
    xq = CODEBOOK[:50] + 0.01 * rng.standard_normal((50, 16)).astype(np.float32)
    res = await api.post(
        "/v1/banks/cb/search?mode=approx&k=1&k_factor=16", json={"queries": xq.tolist()}
    )
    assert res.status_code == 200 and res.headers["x-vqsearch-setting"].startswith("PQ8x4fs,RFlat;")
    assert (np.array(res.json()["ids"])[:, 0] == np.arange(50)).mean() >= 0.95
    await api.post("/v1/banks/cb/vectors", json={"vectors": xq[:1].tolist()})
    info = await _wait_index(api, "cb")
    assert info["state"] == "ready" and info["ntotal"] == 513
    assert info["bank_version"] == (await api.get("/v1/banks/cb")).json()["version"]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
async def test_default_index_is_codes_only_and_the_bank_reranks_exactly(settings, rng, metric):
    """With no spec the index holds 4-bit codes only; mode=approx scores its shortlist from
    the bank's rows, so every distance is the float64 distance of its id (as mode=exact
    reports it), deleted ids never come back, and the info says what the index costs."""
    xb = rng.standard_normal((2000, 16)).astype(np.float32)
    async with app_client(settings) as api:
        await api.put("/v1/banks/big", json={"vectors": xb.tolist(), "metric": metric})
        gone = list(range(0, 2000, 7))
        await api.request("DELETE", "/v1/banks/big/vectors", json={"ids": gone})
        r = await api.put("/v1/banks/big/index")
        assert r.status_code == 202 and r.json()["spec"] == "PQ8x4fs"
        info = await _wait_index(api, "big")
        assert info["rerank"] == "bank" and info["ntotal"] == 2000 - len(gone)
        assert 8 / 2 + 8 <= info["bytes_per_vector"] < 16 and info["bytes"] > 0
        bank = (await api.get("/v1/banks/big")).json()
        assert bank["bytes_on_disk"] >= bank["bytes"] + info["bytes"]
        await api.request("DELETE", "/v1/banks/big/vectors", json={"ids": [1, 2, 3]})
        xq = rng.standard_normal((40, 16)).astype(np.float32)
        # the write made the index stale; this server rebuilds it, so wait for that
        await _wait_index(api, "big")
        res = await api.post(
            "/v1/banks/big/search?mode=approx&k=5&k_factor=2", json={"queries": xq.tolist()}
        )
        assert res.status_code == 200
        assert res.headers["x-vqsearch-setting"] == "PQ8x4fs;k_factor=2.0"
        D, I = np.array(res.json()["distances"]), np.array(res.json()["ids"])
    assert not np.isin(I, [*gone, 1, 2, 3]).any()
    q64, b64 = xq.astype(np.float64)[:, None, :], xb.astype(np.float64)[I]  # (40, 1, d), (40, 5, d)
    if metric == "l2":
        want = ((q64 - b64) ** 2).sum(-1)
    else:
        want = (q64 * b64).sum(-1) / np.linalg.norm(q64, axis=-1) / np.linalg.norm(b64, axis=-1)
    np.testing.assert_allclose(D, want, rtol=1e-6, atol=1e-6)  # float64 rounded to float32
    assert (np.diff(D, axis=1) >= 0).all() if metric == "l2" else (np.diff(D, axis=1) <= 0).all()


async def test_restart_keeps_banks_and_index(settings, rng):
    """A new app on the same data dir serves the same banks, versions and ready index."""
    async with app_client(settings) as a:
        await a.put("/v1/banks/keep", json={"vectors": CODEBOOK.tolist(), "metric": "cosine"})
        await a.post(
            "/v1/banks/keep/vectors", json={"vectors": CODEBOOK[:2].tolist(), "ids": [900, 901]}
        )
        await a.put("/v1/banks/keep/index", json={"spec": "PQ8x4fs"})
        await _wait_index(a, "keep")
        before = (await a.get("/v1/banks/keep")).json()
    async with app_client(settings) as b:
        after = (await b.get("/v1/banks/keep")).json()
        assert after == before
        r = await b.post(
            "/v1/banks/keep/search?mode=approx&k=1", json={"queries": CODEBOOK[:3].tolist()}
        )
        assert r.status_code == 200


async def test_openapi_documents_routes_and_both_formats(api):
    """The OpenAPI schema lists every route and offers JSON and .npy bodies for queries."""
    spec = (await api.get("/openapi.json")).json()
    paths = spec["paths"]
    for p in [
        "/healthz",
        "/readyz",
        "/v1/banks",
        "/v1/banks/{name}",
        "/v1/banks/{name}/vectors",
        "/v1/banks/{name}/search",
        "/v1/banks/{name}/nearest",
        "/v1/banks/{name}/decode",
        "/v1/banks/{name}/index",
    ]:
        assert p in paths, p
    content = paths["/v1/banks/{name}/search"]["post"]["requestBody"]["content"]
    assert {"application/json", NPY, NPZ} <= set(content)


async def test_query_routes_document_name_key_and_version(api):
    """search, nearest and decode, served without FastAPI's dependency solver, still document
    the bank name, the API key and If-Match."""
    paths = (await api.get("/openapi.json")).json()["paths"]
    for op in ("search", "nearest", "decode"):
        params = paths[f"/v1/banks/{{name}}/{op}"]["post"]["parameters"]
        got = {(p["in"], p["name"]) for p in params}
        assert {("path", "name"), ("header", "authorization"), ("header", "if-match")} <= got


def test_an_entry_route_refuses_what_it_would_not_resolve():
    """An EntryRoute endpoint with another parameter, or without Reads or Writes, fails when
    built: nothing it declares is silently skipped."""
    secured = APIRouter(dependencies=Reads, route_class=EntryRoute)
    with pytest.raises(TypeError, match="EntryRoute"):

        @secured.post("/{name}/x")
        async def extra(request: Request, entry: EntryDep, k: int = 1) -> None: ...

    with pytest.raises(TypeError, match="EntryRoute"):

        @APIRouter(route_class=EntryRoute).post("/{name}/y")
        async def open_(request: Request, entry: EntryDep) -> None: ...

    @secured.post("/{name}/z")
    async def fine(request: Request, entry: EntryDep) -> None: ...


async def test_entry_routes_run_what_fastapi_would_add(settings, monkeypatch, tmp_path):
    """Dependencies added where the query router is included, dependency overrides and
    VQSEARCH_OTEL send requests through FastAPI's own handler: nothing declared is skipped."""

    async def gate() -> None:
        raise HTTPException(418, "gated")

    async def no_bank() -> None:
        raise HTTPException(404, "overridden")

    fast: list[int] = []
    entry_of = _deps._entry_of
    monkeypatch.setattr(_deps, "_entry_of", lambda request: fast.append(1) or entry_of(request))
    body = {"queries": CODEBOOK[:1].tolist()}
    for otel in (False, True):
        app = create_app(
            settings.model_copy(update={"otel": otel, "data_dir": tmp_path / str(otel)})
        )
        app.include_router(query.router, prefix="/gated", dependencies=[Depends(gate)])
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
                assert (await c.put("/v1/banks/cb", json={"vectors": CODEBOOK.tolist()})).is_success
                fast.clear()
                assert (await c.post("/v1/banks/cb/nearest", json=body)).status_code == 200
                assert fast == ([] if otel else [1])
                r = await c.post("/gated/v1/banks/cb/nearest", json=body)
                assert r.status_code == 418
                app.dependency_overrides[_deps.get_entry] = no_bank
                r = await c.post("/v1/banks/cb/search", json=body)
                assert (r.status_code, r.json()["detail"]) == (404, "overridden")


async def test_nearest_counts_vectors_along_the_channel_axis(settings):
    """VQSEARCH_MAX_QUERIES counts vectors: (B, C, H, W) with channel_axis=1 holds B*H*W."""
    async with app_client(settings.model_copy(update={"max_queries": 8})) as api:
        assert (await api.put("/v1/banks/cb", json={"vectors": CODEBOOK[:8].tolist()})).is_success
        z = np.moveaxis(CODEBOOK[:8].reshape(2, 2, 2, 16), -1, 1)  # (2, 16, 2, 2): 8 vectors
        r = await api.post("/v1/banks/cb/nearest?channel_axis=1", json={"queries": z.tolist()})
        assert r.status_code == 200 and r.json()["codes"] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
        r = await api.post("/v1/banks/cb/nearest", json={"queries": CODEBOOK[:9].tolist()})
        assert r.status_code == 422 and "limit of 8" in r.json()["detail"]


async def test_demo_codebook_on_empty_data_dir(settings):
    """With VQSEARCH_DEMO on and no banks, the server starts with the seeded demo codebook."""
    async with app_client(settings.model_copy(update={"demo": True})) as c:
        info = (await c.get("/v1/banks/demo")).json()
        assert (info["count"], info["d"]) == (1024, 256)
        assert (await c.get("/readyz")).json() == {"status": "ready", "banks": 1}


async def test_float16_and_float64_queries_accepted(api, rng):
    """float16 and float64 .npy queries are converted and answered like float32 ones."""
    xq = rng.standard_normal((5, 16)).astype(np.float16)
    answers = []
    for dtype in (np.float16, np.float64):
        r = await api.post(
            "/v1/banks/cb/search?k=2", content=npy(xq.astype(dtype)), headers={"content-type": NPY}
        )
        answers.append(_npz(r.content)["ids"])
    np.testing.assert_array_equal(answers[0], answers[1])
    np.testing.assert_array_equal(
        answers[0], brute_force(xq.astype(np.float32), CODEBOOK, 2, "l2")[1]
    )


async def test_read_only_replica_serves_reads_and_refuses_writes(api, settings):
    """A read-only server on the same data dir answers searches and refuses writes with 405."""
    async with app_client(settings.model_copy(update={"read_only": True})) as ro:
        r = await ro.post("/v1/banks/cb/search", json={"queries": CODEBOOK[:1].tolist(), "k": 1})
        assert r.json()["ids"] == [[0]]
        w = await ro.post("/v1/banks/cb/vectors", json={"vectors": CODEBOOK[:1].tolist()})
        assert w.status_code == 405 and "read-only" in w.json()["detail"]


async def test_read_only_replica_follows_the_primarys_writes(api, settings):
    """A replica takes up appends, new banks, deletions and a rebuilt index written by the
    primary, within its refresh interval."""
    ro_settings = settings.model_copy(update={"read_only": True, "refresh_seconds": 0.05})
    async with app_client(ro_settings) as ro:

        async def eventually(check):
            for _ in range(200):
                if await check():
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("replica did not follow")

        await api.post("/v1/banks/cb/vectors", json={"vectors": CODEBOOK[:2].tolist()})
        await eventually(lambda: _count(ro, "cb", 514))
        await api.put("/v1/banks/new", json={"vectors": CODEBOOK[:20].tolist()})
        await eventually(lambda: _count(ro, "new", 20))
        await api.put("/v1/banks/new/index", json={"spec": "PQ4x4fs"})
        await _wait_index(api, "new")

        async def approx_ok():
            r = await ro.post(
                "/v1/banks/new/search?mode=approx&k=1", json={"queries": CODEBOOK[:1].tolist()}
            )
            return r.status_code == 200

        await eventually(approx_ok)
        await api.delete("/v1/banks/new")

        async def gone():
            return (await ro.get("/v1/banks/new")).status_code == 404

        await eventually(gone)


async def _count(client: httpx.AsyncClient, name: str, n: int) -> bool:
    r = await client.get(f"/v1/banks/{name}")
    return r.status_code == 200 and r.json()["count"] == n


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "int8"])
async def test_exact_precision_setting_reaches_the_engine(settings, rng, precision, monkeypatch):
    """VQSEARCH_EXACT_PRECISION picks the engine's candidate scan; the codes stay exact."""
    seen: list[str] = []
    real = Bank.search

    def spy(self, xq, k, device="auto", precision="auto"):
        seen.append(precision)
        return real(self, xq, k, device, precision)

    monkeypatch.setattr(Bank, "search", spy)
    async with app_client(settings.model_copy(update={"exact_precision": precision})) as api:
        await api.put("/v1/banks/cb", json={"vectors": CODEBOOK.tolist()})
        z = rng.standard_normal((50, 16)).astype(np.float32)
        r = await api.post("/v1/banks/cb/nearest", content=npy(z), headers={"content-type": NPY})
    assert seen == [precision]
    np.testing.assert_array_equal(
        np.load(io.BytesIO(r.content)), brute_force(z, CODEBOOK, 1, "l2")[1][:, 0]
    )


async def test_query_string_errors_name_where_they_are(api):
    """A bad query-string parameter is a 422 located at ("query", its name), as FastAPI says."""
    r = await api.post("/v1/banks/cb/nearest?codes_dtype=int8", json={"queries": [[0.0] * 16]})
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["query", "codes_dtype"]
    assert "query.codes_dtype" in r.json()["detail"]
    r = await api.post("/v1/banks/cb/search?k=1", json={"queries": [[0.0] * 16]})
    assert r.status_code == 200


async def test_shards_without_a_cluster_are_refused_and_ray_is_not_imported(settings):
    """`?shards=2` on a server without VQSEARCH_RAY_ADDRESS: a 422 naming it; the server
    never imports Ray."""
    import sys

    from tests.service.conftest import app_client

    had_ray = "ray" in sys.modules
    async with app_client(settings) as c:
        r = await c.put("/v1/banks/s?shards=2", json={"vectors": [[1.0, 2.0]]})
        assert r.status_code == 422, r.text
        assert "VQSEARCH_RAY_ADDRESS" in r.json()["detail"]
        r = await c.put("/v1/banks/s?shards=0", json={"vectors": [[1.0, 2.0]]})
        assert r.status_code == 422, r.text
        assert (await c.put("/v1/banks/s", json={"vectors": [[1.0, 2.0]]})).json()["shards"] == 1
    assert had_ray or "ray" not in sys.modules
