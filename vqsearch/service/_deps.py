"""FastAPI dependencies: who may call a route (`Reads`, `Writes`, `Open`: API keys), the
settings, the registry, a bank by name (with `If-Match`); and the hot routes' fast path
(`EntryRoute`, served by a plain Starlette `FastEntryRoute` beside it), through FastAPI's and
Starlette's public API only.

All `async def`: none blocks, and FastAPI runs a plain `def` dependency on a worker thread,
a thread hop per dependency per request (measured: a third of a one-vector request's time)."""

from __future__ import annotations

import hmac
import inspect
import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from starlette.routing import Match, Route, compile_path
from starlette.types import Scope

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
    can guard (a mount, a plain Starlette route) other than FastAPI's own docs and the
    `FastEntryRoute`s that run the access check of a route the app includes."""
    docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    contexts = list(iter_route_contexts(app.routes))
    for context in contexts:
        route, methods = context.original_route, set(context.methods or ())
        what = f"{'/'.join(sorted(methods))} {context.path}"
        if isinstance(route, FastEntryRoute):
            _check_fast(route, contexts, what)
            continue
        if not isinstance(route, APIRoute):
            if isinstance(route, Route) and context.path in docs:
                continue
            raise RuntimeError(f"{what}: {type(route).__name__} cannot declare access")
        access = _access_of(context.dependant)
        if not access:
            raise RuntimeError(f"{what} declares no access: add Reads, Writes or Open")
        if "admin" not in access and methods & UNSAFE_METHODS:
            raise RuntimeError(f"{what} writes: declare Writes")


def _check_fast(route: FastEntryRoute, contexts: list[RouteContext], what: str) -> None:
    """A FastEntryRoute answers for a FastAPI route the app serves, with the same path and
    methods, and runs exactly the access check declared there."""
    served = route.context
    if not any(
        c.original_route is served.original_route and c.path == served.path for c in contexts
    ):
        raise RuntimeError(f"{what}: serves a route the app does not include, to declare access")
    if (route.path, route.methods) != (served.path, served.methods):
        raise RuntimeError(f"{what}: serves {served.path}, which declares its own access")
    level = ACCESS.get(route.access)
    if _fast_access(served) is not route.access or {level} != _access_of(served.dependant):
        raise RuntimeError(f"{what}: checks {level} access, not what {served.path} declares")
    if level != "admin" and route.methods and route.methods & UNSAFE_METHODS:
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


AccessCheck = Callable[[Request, str | None], Coroutine[Any, Any, None]]


def _fast_access(route: Any) -> AccessCheck | None:
    """The access check of a route (an APIRoute, or a `RouteContext`: one as included) that a
    `FastEntryRoute` can serve: `Reads` or `Writes` and the bank, nothing else; None
    otherwise."""
    calls = _dependency_calls(route)
    for access in (read_key, admin_key):
        if calls == {access, get_entry}:
            return access
    return None


class EntryRoute(APIRoute):
    """A FastAPI route declared `(request: Request, entry: EntryDep)` with router-level
    `Reads` (or `Writes`), documented, matched and served by FastAPI like any other, that
    `add_fast_routes` also serves without FastAPI's per-request dependency solver (profiled
    under 64 one-vector clients, the solver was a sixth of the event loop's time). Another
    parameter or dependency on the route is refused when it is built: nothing declared could
    be skipped."""

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


class FastEntryRoute(Route):
    """A plain Starlette route, placed before the FastAPI route it serves (`context`: an
    EntryRoute as included, same path and methods), that runs the access check declared
    there (`access`, one of `ACCESS`, which `check_access` compares with the declaration),
    resolves the bank as `EntryDep` would (`_entry_of`: the same checks, answers and order)
    and calls the endpoint. The FastAPI route stays the one documented (OpenAPI skips plain
    routes) and answers whatever this one does not match: another method (405), and every
    request while any dependency is overridden."""

    def __init__(self, context: RouteContext, access: AccessCheck) -> None:
        if (
            not isinstance(context.original_route, EntryRoute)
            or _fast_access(context) is not access
        ):
            raise TypeError(f"{context.path}: a FastEntryRoute serves an EntryRoute, its access")
        self.context, self.access = context, access
        endpoint = context.endpoint
        assert endpoint is not None and context.path is not None

        async def serve(request: Request) -> Response:
            # self.access, not the argument: what check_access compares is what runs
            await self.access(request, request.headers.get("authorization"))
            response: Response = await endpoint(request, await _entry_of(request))
            return response

        super().__init__(
            context.path,
            serve,
            methods=context.methods,
            name=context.name,
            include_in_schema=False,
        )

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.FULL or scope["app"].dependency_overrides:
            return Match.NONE, {}  # FastAPI's route answers
        child_scope["route"] = self.context.original_route  # what FastAPI's route would set
        return match, child_scope


def add_fast_routes(app: FastAPI) -> None:
    """Serve every EntryRoute the app includes so far, where its inclusion adds nothing to it
    (no dependency, no body limit), through a `FastEntryRoute` put just before the included
    router holding it: matched first, as the FastAPI route would be. Not with
    `VQSEARCH_OTEL` (`create_app` does not call it): FastAPI's spans wrap its solver."""
    routes = app.router.routes
    served = {
        (id(r.context.original_route), r.path) for r in routes if isinstance(r, FastEntryRoute)
    }
    for i in reversed(range(len(routes))):
        fast = []
        for context in iter_route_contexts([routes[i]]):
            if not isinstance(context.original_route, EntryRoute):
                continue
            access = _fast_access(context)
            if (
                access is not None
                and getattr(context, "max_body_size", None) is None
                and (id(context.original_route), context.path) not in served
            ):
                fast.append(FastEntryRoute(context, access))
        routes[i:i] = fast


def write_routes(app: FastAPI) -> list[tuple[re.Pattern[str], frozenset[str]]]:
    """(path regex, methods) of every route that declares `Writes`: what a replica that serves
    reads sends on to the writer (`_forward.ForwardWrites`)."""
    found = []
    for context in iter_route_contexts(app.routes):
        route, path = context.original_route, context.path
        if isinstance(route, APIRoute) and path and "admin" in _access_of(context.dependant):
            found.append((compile_path(path)[0], frozenset(context.methods or ())))
    return found
