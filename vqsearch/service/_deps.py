"""FastAPI dependencies: who may call a route (`Reads`, `Writes`, `Open`: API keys), the
settings, the registry, a bank by name (with `If-Match`).

All `async def`: none blocks, and FastAPI runs a plain `def` dependency on a worker thread,
a thread hop per dependency per request (measured: a third of a one-vector request's time)."""

from __future__ import annotations

import hmac
import inspect
import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import fastapi.routing
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import Route

from vqsearch._wire_names import VERSION_HEADER

from ._entry import Entry
from ._registry import Registry
from ._settings import Settings

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
BankName = Annotated[
    str, Path(pattern=NAME_PATTERN, description="letters, digits, '.', '_', '-'; at most 64")
]


async def get_entry(
    request: Request,
    name: BankName,
    if_match: Annotated[
        str | None, Header(description="bank version the request is pinned to")
    ] = None,
) -> Entry:
    """The named bank (404 if none); 412 if `If-Match` names a version it no longer has.
    (The registry and settings are read from app.state here and in `authorize`, not through
    sub-dependencies: each is one more pass of FastAPI's dependency solver per request.)"""
    entry = request.app.state.registry.get(name)
    if if_match is not None:
        wanted = {v.strip().removeprefix("W/").strip('"') for v in if_match.split(",")}
        if "*" not in wanted and entry.version not in wanted:
            raise HTTPException(
                412,
                f"bank {name!r} is at version {entry.version}, not {if_match}",
                headers={VERSION_HEADER: entry.version},
            )
    return entry


EntryDep = Annotated[Entry, Depends(get_entry)]


def _matches(key: str, keys: list[str]) -> bool:
    # every key is compared, each in constant time: no early exit to time
    hits = [hmac.compare_digest(key.encode(), k.encode()) for k in keys]
    return any(hits)


Authorization = Annotated[str | None, Header(description="Bearer <API key>")]


async def authorize(request: Request, authorization: str | None, *, admin: bool) -> None:
    """401 without a known key, 403 for a read key where `admin` is needed; open when no key
    is set. Not a dependency itself: routes declare `Reads`, `Writes` or `Open`."""
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        return
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(
            401,
            "an API key is required: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = key.strip()
    is_admin = _matches(key, settings.admin_key_list)
    is_read = _matches(key, settings.read_key_list)
    if not (is_admin or is_read):
        raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    if admin and not is_admin:
        raise HTTPException(403, "this API key may only read; writes need an admin key")


async def read_key(request: Request, authorization: Authorization = None) -> None:
    """A read or an admin key."""
    await authorize(request, authorization, admin=False)


async def admin_key(request: Request, authorization: Authorization = None) -> None:
    """An admin key."""
    await authorize(request, authorization, admin=True)


async def no_key() -> None:
    """Anyone: the route is open by design (health)."""


async def metrics_key(request: Request, authorization: Authorization = None) -> None:
    """Anyone with VQSEARCH_METRICS_PUBLIC (the default), else a read or an admin key."""
    if not request.app.state.settings.metrics_public:
        await authorize(request, authorization, admin=False)


# Who may call a route is declared where the route is, as one of these (on the route, its
# router, or where the router is included), and checked by the route FastAPI matched: never
# by the path's text. A route that declares none is refused at startup (`check_access`).
Reads = [Depends(read_key)]
Writes = [Depends(admin_key)]
Open = [Depends(no_key)]
MetricsAccess = [Depends(metrics_key)]
ACCESS: dict[Callable[..., Any], str] = {
    read_key: "read",
    admin_key: "admin",
    no_key: "open",
    metrics_key: "metrics",
}
UNSAFE_METHODS = frozenset({"PUT", "PATCH", "DELETE"})


def _access_of(dependant: Any) -> set[str]:
    """The access levels declared anywhere in a route's dependency tree (each one runs)."""
    found, todo = set(), list(dependant.dependencies)
    while todo:
        d = todo.pop()
        if d.call in ACCESS:
            found.add(ACCESS[d.call])
        todo.extend(d.dependencies)
    return found


def check_access(app: FastAPI) -> None:
    """Refuse to serve a route (route x methods, as included) that does not declare who may
    call it, a PUT, PATCH or DELETE open to less than an admin key, or a route no dependency
    can guard (a mount, a plain Starlette route) other than FastAPI's own docs."""
    docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    for context in iter_route_contexts(app.routes):
        route, methods = context.original_route, set(context.methods or ())
        what = f"{'/'.join(sorted(methods))} {context.path}"
        if not isinstance(route, APIRoute):
            if isinstance(route, Route) and context.path in docs:
                continue
            raise RuntimeError(f"{what}: {type(route).__name__} cannot declare access")
        access = _access_of(context.dependant)
        if not access:
            raise RuntimeError(f"{what} declares no access: add Reads, Writes or Open")
        if "admin" not in access and methods & UNSAFE_METHODS:
            raise RuntimeError(f"{what} writes: declare Writes")


async def _entry_of(request: Request) -> Entry:
    """What `EntryDep` gives a route (after its access check), checked in the same order."""
    name = request.path_params["name"]
    if _NAME.fullmatch(name) is None:
        raise RequestValidationError(
            [
                {
                    "type": "string_pattern_mismatch",
                    "loc": ("path", "name"),
                    "msg": f"String should match pattern '{NAME_PATTERN}'",
                    "input": name,
                }
            ]
        )
    return await get_entry(request, name, request.headers.get("if-match"))


def _dependency_calls(route: Any) -> set[Any]:
    return {d.call for d in route.dependant.dependencies}


def _fast_access(route: Any) -> Callable[..., Coroutine[Any, Any, None]] | None:
    """The access check of a route declared as an EntryRoute serves it: `Reads` or `Writes`
    and the bank, nothing else; None otherwise."""
    calls = _dependency_calls(route)
    for access in (read_key, admin_key):
        if calls == {access, get_entry}:
            return access
    return None


class EntryRoute(APIRoute):
    """A route documented like any other from its declared signature
    `(request: Request, entry: EntryDep)` and router-level `Reads` (or `Writes`), but served
    without FastAPI's per-request dependency solver: the handler runs that access check and
    resolves the entry itself (`_entry_of`: the same checks, answers and order) and calls the
    endpoint. Profiled under 64 one-vector clients, the solver was a sixth of the event loop's
    time.

    Nothing declared is skipped: another parameter or dependency on the route is refused when
    it is built; dependencies added where the router is included, overrides of any dependency,
    and `VQSEARCH_OTEL` (FastAPI's spans wrap the solver) send requests through FastAPI's own
    handler."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        params = list(inspect.signature(endpoint).parameters)
        if (
            _fast_access(self) is None
            or params != ["request", "entry"]
            or not inspect.iscoroutinefunction(endpoint)
        ):
            raise TypeError(
                f"{path}: an EntryRoute takes (request, entry) and Reads or Writes only, async"
            )

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        standard = super().get_route_handler()
        # Included in a router or app: FastAPI builds the handler once per inclusion, under a
        # context that carries the dependencies added there (a private FastAPI name: without
        # it those cannot be seen, so every request goes through FastAPI's handler).
        context_var = getattr(fastapi.routing, "_effective_route_context_var", None)
        if context_var is None:
            return standard
        context = context_var.get()
        if context is None or context.original_route is not self:
            context = self
        access = _fast_access(context)
        if access is None:
            return standard
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            app = request.app
            if app.state.settings.otel or app.dependency_overrides:
                return await standard(request)
            await access(request, request.headers.get("authorization"))
            response: Response = await endpoint(request, await _entry_of(request))
            return response

        return handler
