"""The service in one style: FastAPI's and Starlette's public API only, and the hot routes'
fast path (plain Starlette `FastEntryRoute`s before the FastAPI routes they serve) answering
exactly as FastAPI's own handler does."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts

from tests.service.conftest import CODEBOOK
from vqsearch.service import Settings, _deps, create_app
from vqsearch.service._deps import EntryDep, EntryRoute, FastEntryRoute, Reads
from vqsearch.service.routes import query

SERVICE = Path(_deps.__file__).parent
FRAMEWORKS = ("fastapi", "starlette")
READ, ADMIN = "r-key", "a-key"
HOT = {"/v1/banks/{name}/search", "/v1/banks/{name}/nearest", "/v1/banks/{name}/decode"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_names(tree: ast.AST) -> Iterator[str]:
    """Names a module defines itself: functions, classes, assignment targets, attributes
    assigned (`self._x = ...`), parameters."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.name
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            yield node.id
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            yield node.attr
        elif isinstance(node, ast.arg):
            yield node.arg


def _framework_private_names() -> set[str]:
    """Every private name defined anywhere in FastAPI's and Starlette's sources."""
    names: set[str] = set()
    for package in FRAMEWORKS:
        root = Path(sys.modules[package].__file__ or "").parent
        for path in root.rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names |= {n for n in _defined_names(tree) if _is_private(n)}
    return names


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def private_uses(source: str, framework_private: set[str], ours: set[str]) -> list[str]:
    """Private FastAPI or Starlette names `source` uses: imported (`from fastapi._x import`,
    `from starlette.routing import _y`), reached through an imported framework name
    (`fastapi.routing._z`, `routing._z`), through getattr/hasattr/setattr with the name as a
    string, or as the attribute of any object where the name is the frameworks' and not ours
    (`context._route_context`)."""
    tree = ast.parse(source)
    found: list[str] = []
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in FRAMEWORKS:
                    imported.add(alias.asname or parts[0])
                    found += [f"import {alias.name}" for p in parts if _is_private(p)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] in FRAMEWORKS:
                if any(_is_private(p) for p in parts):
                    found.append(f"from {node.module} import ...")
                for alias in node.names:
                    imported.add(alias.asname or alias.name)
                    if _is_private(alias.name):
                        found.append(f"from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            if _root(node) in imported or (
                node.attr in framework_private and node.attr not in ours
            ):
                found.append(f"line {node.lineno}: .{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "hasattr", "setattr", "delattr"}
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _is_private(node.args[1].value)
        ):
            name = node.args[1].value
            if _root(node.args[0]) in imported or (name in framework_private and name not in ours):
                found.append(f"line {node.lineno}: {node.func.id}(..., {name!r})")
    return found


@pytest.fixture(scope="module")
def framework_private() -> set[str]:
    return _framework_private_names()


def _ours() -> set[str]:
    names: set[str] = set()
    for path in SERVICE.rglob("*.py"):
        names |= set(_defined_names(ast.parse(path.read_text(encoding="utf-8"))))
    return names


def test_the_service_uses_no_private_fastapi_or_starlette_name(framework_private):
    """No module of vqsearch/service imports, reaches or getattr()s a private name of FastAPI
    or Starlette (`grep -rn "fastapi\\.[a-z_.]*\\._" vqsearch` stays empty as well)."""
    ours = _ours()
    found = {}
    for path in sorted(SERVICE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        uses = private_uses(source, framework_private, ours)
        uses += [m.group(0) for m in re.finditer(r"(fastapi|starlette)\.[a-z_.]*\._\w*", source)]
        if uses:
            found[str(path.relative_to(SERVICE))] = uses
    assert found == {}


@pytest.mark.parametrize(
    "source",
    [
        "import fastapi.routing\nx = fastapi.routing._effective_route_context_var",
        "import fastapi.routing\nx = getattr(fastapi.routing, '_effective_route_context_var')",
        "from fastapi import routing\nx = routing._get_fastapi_scope",
        "from fastapi.routing import _IncludedRouter",
        "from fastapi._compat import ModelField",
        "import starlette._utils",
        "def f(context):\n    return context._route_context",
        "def f(route):\n    return getattr(route, '_embed_body_fields', None)",
    ],
)
def test_the_scan_finds_private_names(source, framework_private):
    """The scan above is not vacuous: each of these is reported."""
    assert private_uses(source, framework_private, set())


def test_the_scan_leaves_our_own_private_names(framework_private):
    source = "from fastapi import FastAPI\nclass A:\n    def _arm(self):\n        self._t = 1\n"
    assert private_uses(source, framework_private, {"_arm", "_t"}) == []


def _keyed(settings: Settings, **update: object) -> Settings:
    return settings.model_copy(update={"read_keys": READ, "admin_keys": ADMIN, **update})


def test_hot_routes_have_fast_routes_and_fastapi_documents_them(settings):
    """search, nearest and decode each have a FastEntryRoute just before the FastAPI route
    it serves, same path and methods; the OpenAPI served is FastAPI's from its own routes (the
    fast ones add nothing to it); with VQSEARCH_OTEL there are none."""
    app = create_app(settings)
    contexts = list(iter_route_contexts(app.routes))
    fast = [c.original_route for c in contexts if isinstance(c.original_route, FastEntryRoute)]
    assert {r.path for r in fast} == HOT and len(fast) == len(HOT)
    for route in fast:
        assert isinstance(route.context.original_route, EntryRoute)
        assert route.methods == route.context.methods == {"POST"}
        assert route.access is _deps.read_key
        served = [c.original_route for c in contexts].index(route.context.original_route)
        assert [c.original_route for c in contexts].index(route) < served
    api_only = [c for c in contexts if isinstance(c.original_route, APIRoute)]
    documented = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=api_only
    )
    assert app.openapi() == documented
    assert set(documented["paths"]) >= HOT
    otel = create_app(settings.model_copy(update={"otel": True}))
    assert not any(
        isinstance(c.original_route, FastEntryRoute) for c in iter_route_contexts(otel.routes)
    )


def _requests() -> list[tuple[str, str, dict[str, str], dict[str, object]]]:
    one = {"queries": CODEBOOK[:1].tolist()}
    key = {"authorization": f"Bearer {READ}"}
    return [
        ("good nearest", "/v1/banks/cb/nearest", key, one),
        ("good search", "/v1/banks/cb/search", key, {**one, "k": 3}),
        ("good decode", "/v1/banks/cb/decode", key, {"codes": [[0, 1], [2, 3]]}),
        ("bad name", "/v1/banks/-cb/nearest", key, one),
        ("bad name, no key", "/v1/banks/-cb/nearest", {}, one),
        ("unknown bank", "/v1/banks/nope/nearest", key, one),
        ("unknown bank, unknown key", "/v1/banks/nope/search", {"authorization": "Bearer x"}, one),
        ("no key", "/v1/banks/cb/nearest", {}, one),
        ("not bearer", "/v1/banks/cb/decode", {"authorization": READ}, {"codes": [0]}),
        ("stale If-Match", "/v1/banks/cb/nearest", {**key, "if-match": '"v0"'}, one),
        ("bad body", "/v1/banks/cb/nearest", key, {"queries": "x"}),
    ]


def _answer(r: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    headers = {k: v for k, v in r.headers.items() if k not in ("x-request-id", "date")}
    return r.status_code, r.content, headers


async def test_fast_routes_answer_as_fastapi_does(settings, monkeypatch):
    """Every answer of the fast routes (a good request; a bad bank name, an unknown bank, a
    missing or unknown key, a stale If-Match, a bad body) is FastAPI's own handler's, to the
    byte and header, as served once any dependency is overridden (here read_key by itself);
    and the routes' metrics are labelled with the route either way."""
    calls: list[str] = []
    entry_of = _deps._entry_of
    monkeypatch.setattr(_deps, "_entry_of", lambda r: calls.append(r.url.path) or entry_of(r))
    keyed = _keyed(settings)
    app = create_app(keyed)
    answers: dict[bool, dict[str, tuple[int, bytes, dict[str, str]]]] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            r = await c.put(
                "/v1/banks/cb",
                json={"vectors": CODEBOOK.tolist()},
                headers={"authorization": f"Bearer {ADMIN}"},
            )
            assert r.status_code == 201, r.text
            for overridden in (False, True):
                if overridden:
                    app.dependency_overrides[_deps.read_key] = _deps.read_key
                calls.clear()
                answers[overridden] = {}
                for what, path, headers, body in _requests():
                    r = await c.post(path, json=body, headers=headers)
                    answers[overridden][what] = _answer(r)
                # the fast path resolves the bank whenever the key passes; FastAPI never calls it
                assert bool(calls) is not overridden, calls
            metrics = (await c.get("/metrics")).text
    assert answers[False] == answers[True]
    got = {what: a[0] for what, a in answers[False].items()}
    assert got == {
        "good nearest": 200,
        "good search": 200,
        "good decode": 200,
        "bad name": 422,
        "bad name, no key": 401,
        "unknown bank": 404,
        "unknown bank, unknown key": 401,
        "no key": 401,
        "not bearer": 401,
        "stale If-Match": 412,
        "bad body": 422,
    }
    for op in ("search", "nearest", "decode"):
        assert f'route="/v1/banks/{{name}}/{op}"' in metrics, op


async def test_other_methods_on_hot_paths_are_fastapis(settings):
    """A GET on a hot path is answered by the FastAPI route (405, its Allow header)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            r = await c.get("/v1/banks/cb/nearest")
            assert (r.status_code, r.headers["allow"]) == (405, "POST")


def _swap_access(app, access) -> None:
    """Make the nearest route's FastEntryRoute run `access` instead."""
    for route in app.router.routes:
        if isinstance(route, FastEntryRoute) and route.path.endswith("/nearest"):
            route.access = access
            return
    raise AssertionError("no fast nearest route")


def test_a_fast_route_is_built_for_an_entry_route_and_its_access_only(settings):
    app = create_app(settings)
    contexts = list(iter_route_contexts(app.routes))
    entry = next(c for c in contexts if isinstance(c.original_route, EntryRoute))
    other = next(c for c in contexts if c.path == "/v1/banks/{name}" and c.methods == {"GET"})
    FastEntryRoute(entry, _deps.read_key)
    for context, access in (
        (entry, _deps.no_key),
        (entry, _deps.admin_key),
        (other, _deps.read_key),
    ):
        with pytest.raises(TypeError, match="FastEntryRoute"):
            FastEntryRoute(context, access)


def _foreign(app, settings) -> None:
    """A fast route serving an EntryRoute the app does not include, put first."""
    router = APIRouter(prefix="/v1/banks", dependencies=Reads, route_class=EntryRoute)

    @router.post("/{name}/extra")
    async def extra(request: Request, entry: EntryDep) -> Response:
        return Response()

    (context,) = iter_route_contexts(router.routes)
    app.router.routes.insert(0, FastEntryRoute(context, _deps.read_key))


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda app, _: _swap_access(app, _deps.no_key), id="weaker-access"),
        pytest.param(lambda app, _: _swap_access(app, _deps.admin_key), id="other-access"),
        pytest.param(_foreign, id="serves-a-route-not-included"),
    ],
)
async def test_fast_routes_must_run_the_declared_access(settings, tamper):
    """check_access refuses a fast route whose access check is not the one the FastAPI route
    it serves declares, or which serves a route the app does not include."""
    app = create_app(settings)
    tamper(app, settings)
    with pytest.raises(RuntimeError, match="declare"):
        async with app.router.lifespan_context(app):
            pass


def test_query_routes_are_entry_routes():
    """The hot routes are declared as EntryRoutes (served fast), their access `Reads`."""
    routes = [r for r in query.router.routes if isinstance(r, APIRoute)]
    assert {r.path for r in routes} == HOT
    assert all(isinstance(r, EntryRoute) for r in routes)
    assert all(_deps._fast_access(r) is _deps.read_key for r in routes)
