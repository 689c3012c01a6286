"""Who may call what: every route x method the app serves, against no key, an unknown key, a
read key and an admin key, with bank names that look like route suffixes.

The policy is written out here, not read back from the routes: a route added later is
enumerated from the app and expected admin-only until it is listed below as a read."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import iter_route_contexts
from starlette.routing import Mount

from tests.service.conftest import CODEBOOK, Server
from vqsearch.service import Settings, create_app
from vqsearch.service._deps import EntryDep, Open, Reads, Writes
from vqsearch.service.routes import query

READ, ADMIN, UNKNOWN = "r-key", "a-key", "not-a-key"
# Bank names that end the way read routes do, or name other routes' last segment.
NAMES = ("cb", "search", "nearest", "decode", "vectors", "index", "tradeoff", "usage")
READS = {
    ("GET", "/v1/banks"),
    ("GET", "/v1/banks/{name}"),
    ("GET", "/v1/banks/{name}/usage"),
    ("GET", "/v1/banks/{name}/tradeoff"),
    ("POST", "/v1/banks/{name}/search"),
    ("POST", "/v1/banks/{name}/nearest"),
    ("POST", "/v1/banks/{name}/decode"),
}
OPEN_PATHS = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
WRITES = {  # at least these: the enumeration below must find them
    ("PUT", "/v1/banks/{name}"),
    ("DELETE", "/v1/banks/{name}"),
    ("POST", "/v1/banks/{name}/vectors"),
    ("DELETE", "/v1/banks/{name}/vectors"),
    ("PUT", "/v1/banks/{name}/index"),
    ("POST", "/v1/banks/{name}/tradeoff"),
}
SMALL = CODEBOOK[:3].tolist()  # under a sweep's 10 vectors: nothing heavy starts
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _h(key: str | None) -> dict[str, str]:
    return {} if key is None else {"authorization": f"Bearer {key}"}


def operations(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path template) the app serves, included routers flattened."""
    return sorted(
        (method, context.path)
        for context in iter_route_contexts(app.routes)
        for method in context.methods or ()
    )


def role(method: str, path: str, metrics_public: bool) -> str:
    if path in OPEN_PATHS or (path == "/metrics" and metrics_public):
        return "open"
    if (method, path) in READS or (method, path) == ("GET", "/metrics"):
        return "read"
    return "admin"


def fill(path: str, name: str) -> str:
    return re.sub(r"\{[^}]+\}", name, path)


async def call(c: httpx.AsyncClient, method: str, path: str, key: str | None) -> httpx.Response:
    # An inert body: a JSON array where every route wants an object (422 once authorized),
    # so that an admin key's writes are answered without building or sweeping anything.
    body = {"content": b"[]", "headers": {"content-type": "application/json"}}
    kw = body if method in BODY_METHODS else {}
    headers = {**kw.pop("headers", {}), **_h(key)}
    return await c.request(method, path, headers=headers, **kw)


@asynccontextmanager
async def served(
    settings: Settings, app: FastAPI | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    app = app or create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return settings.model_copy(update={"read_keys": READ, "admin_keys": ADMIN})


async def _banks(c: httpx.AsyncClient) -> dict[str, tuple[str, int]]:
    r = await c.get("/v1/banks", headers=_h(ADMIN))
    assert r.status_code == 200, r.text
    return {b["name"]: (b["version"], b["count"]) for b in r.json()}


@pytest.mark.parametrize("metrics_public", [True, False])
async def test_every_route_and_method_by_key(keyed, metrics_public):
    """No key or an unknown key: 401 with WWW-Authenticate; a read key: 403 on every write and
    served on every read; an admin key: never 401 or 403; open routes: open to all. Nothing a
    refused request names is created, changed or deleted."""
    settings = keyed.model_copy(update={"metrics_public": metrics_public})
    app = create_app(settings)
    ops = operations(app)
    assert set(ops) >= READS | WRITES, set(ops)  # the enumeration is not vacuous
    async with served(settings, app) as c:
        for name in NAMES:
            r = await c.put(f"/v1/banks/{name}", json={"vectors": SMALL}, headers=_h(ADMIN))
            assert r.status_code == 201, (name, r.text)
        before = await _banks(c)
        assert set(before) == set(NAMES)
        for method, template in ops:
            need = role(method, template, metrics_public)
            for name in NAMES if "{" in template else (None,):
                path = template if name is None else fill(template, name)
                what = (method, path, need)
                for key in (None, UNKNOWN):
                    r = await call(c, method, path, key)
                    if need == "open":
                        assert r.status_code not in (401, 403), (what, key, r.text)
                    else:
                        assert r.status_code == 401, (what, key, r.status_code, r.text)
                        assert r.headers["www-authenticate"] == "Bearer", what
                r = await call(c, method, path, READ)
                if need == "admin":
                    assert r.status_code == 403, (what, r.status_code, r.text)
                    assert "admin" in r.json()["detail"], what
                else:
                    assert r.status_code not in (401, 403, 404, 405), (what, r.text)
                    assert r.status_code < 500, (what, r.text)
        assert await _banks(c) == before  # refused writes changed nothing
        for method, template in ops:
            for name in NAMES if "{" in template else (None,):
                path = template if name is None else fill(template, name)
                r = await call(c, method, path, ADMIN)
                assert r.status_code not in (401, 403), (method, path, r.text)
                assert r.status_code < 500, (method, path, r.text)


async def _named_bank_bypass(c: httpx.AsyncClient) -> None:
    """The reported bypass: a read key creating banks named like read routes, and deleting
    an admin's bank named `decode`."""
    r = await c.put("/v1/banks/decode", json={"vectors": SMALL}, headers=_h(ADMIN))
    assert r.status_code == 201, r.text
    for name in ("search", "nearest", "decode"):
        r = await c.put(f"/v1/banks/{name}", json={"vectors": SMALL}, headers=_h(READ))
        assert r.status_code == 403, (name, r.status_code, r.text)
    r = await c.delete("/v1/banks/decode", headers=_h(READ))
    assert r.status_code == 403, (r.status_code, r.text)
    r = await c.get("/v1/banks/decode", headers=_h(READ))
    assert r.status_code == 200 and r.json()["count"] == len(SMALL), r.text
    names = [b["name"] for b in (await c.get("/v1/banks", headers=_h(READ))).json()]
    assert names == ["decode"]  # neither `search` nor `nearest` was created
    r = await c.post("/v1/banks/decode/decode", json={"codes": [0, 1]}, headers=_h(READ))
    assert r.status_code == 200, r.text  # and the read key still reads it


async def test_read_key_cannot_create_or_delete_banks_named_like_reads(keyed):
    async with served(keyed) as c:
        await _named_bank_bypass(c)


async def test_read_key_cannot_create_or_delete_banks_over_tcp(tmp_path):
    """The same against a real `vqsearch serve` with the keys from the environment."""
    srv = Server(tmp_path / "srv", VQSEARCH_READ_KEYS=READ, VQSEARCH_ADMIN_KEYS=ADMIN).start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            await _named_bank_bypass(c)
    finally:
        srv.stop()


async def test_access_declared_where_a_router_is_included(keyed):
    """`Writes` added where the query router is included makes its reads admin-only there
    (the query routes' own fast path included), and stays a read where it was not."""
    app = create_app(keyed)
    app.include_router(query.router, prefix="/admin", dependencies=Writes)
    async with served(keyed, app) as c:
        r = await c.put("/v1/banks/cb", json={"vectors": SMALL}, headers=_h(ADMIN))
        assert r.status_code == 201
        body = {"queries": SMALL[:1]}
        r = await c.post("/admin/v1/banks/cb/nearest", json=body, headers=_h(READ))
        assert r.status_code == 403, r.text
        assert (await c.post("/admin/v1/banks/cb/nearest", json=body)).status_code == 401
        r = await c.post("/admin/v1/banks/cb/nearest", json=body, headers=_h(ADMIN))
        assert r.status_code == 200, r.text
        r = await c.post("/v1/banks/cb/nearest", json=body, headers=_h(READ))
        assert r.status_code == 200, r.text


def _with_route(settings: Settings, add) -> FastAPI:
    app = create_app(settings)
    add(app)
    return app


async def _ok(request: Request) -> dict[str, str]:
    return {}


@pytest.mark.parametrize(
    "add",
    [
        pytest.param(lambda app: app.get("/v1/undeclared")(_ok), id="no-access"),
        pytest.param(lambda app: app.include_router(_router("/v1/x", "PUT", Reads)), id="read-put"),
        pytest.param(
            lambda app: app.include_router(_router("/v1/x", "DELETE", Open)), id="open-delete"
        ),
        pytest.param(lambda app: app.routes.append(Mount("/files", app=_ok)), id="mount"),
    ],
)
async def test_undeclared_access_is_refused_at_startup(settings, add):
    """A route that does not say who may call it, a write open to less than an admin key, or
    a route no dependency can guard: the server refuses to start."""
    app = _with_route(settings, add)
    with pytest.raises(RuntimeError, match="declare"):
        async with app.router.lifespan_context(app):
            pass


def _router(path: str, method: str, access: list) -> APIRouter:
    router = APIRouter()

    async def endpoint(request: Request, entry: EntryDep) -> dict[str, str]:
        return {}

    router.add_api_route(path, endpoint, methods=[method], dependencies=access)
    return router
