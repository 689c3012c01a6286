"""FastAPI dependencies: the settings, the registry, a bank by name (with `If-Match`).

All `async def`: none blocks, and FastAPI runs a plain `def` dependency on a worker thread,
a thread hop per dependency per request (measured: a third of a one-vector request's time)."""

from __future__ import annotations

import hmac
import inspect
import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import fastapi.routing
from fastapi import Depends, Header, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from ._registry import Entry, Registry
from ._settings import Settings

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
VERSION_HEADER = "X-Vqsearch-Bank-Version"
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

READ_ROUTES = ("/search", "/nearest", "/decode")


def _matches(key: str, keys: list[str]) -> bool:
    # every key is compared, each in constant time: no early exit to time
    hits = [hmac.compare_digest(key.encode(), k.encode()) for k in keys]
    return any(hits)


async def authorize(
    request: Request,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
) -> None:
    """Read keys may search, nearest, decode and read; admin keys may do everything.
    401 without a known key, 403 with a key of the wrong role; open when no key is set."""
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
    admin = _matches(key, settings.admin_key_list)
    read = _matches(key, settings.read_key_list)
    if not (admin or read):
        raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    reading = request.method in ("GET", "HEAD") or request.url.path.endswith(READ_ROUTES)
    if not reading and not admin:
        raise HTTPException(403, "this API key may only read; writes need an admin key")


Authorized = [Depends(authorize)]


async def _entry_of(request: Request) -> Entry:
    """What `Authorized` and `EntryDep` give a route, checked in the same order."""
    await authorize(request, request.headers.get("authorization"))
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


class EntryRoute(APIRoute):
    """A route documented like any other from its declared signature
    `(request: Request, entry: EntryDep)` and router-level `Authorized`, but served without
    FastAPI's per-request dependency solver: the handler resolves the entry itself
    (`_entry_of`: the same checks, answers and order) and calls the endpoint. Profiled under
    64 one-vector clients, the solver was a sixth of the event loop's time.

    Nothing declared is skipped: another parameter or dependency on the route is refused when
    it is built; dependencies added where the router is included, overrides of any dependency,
    and `VQSEARCH_OTEL` (FastAPI's spans wrap the solver) send requests through FastAPI's own
    handler."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        params = list(inspect.signature(endpoint).parameters)
        if (
            _dependency_calls(self) != {authorize, get_entry}
            or params != ["request", "entry"]
            or not inspect.iscoroutinefunction(endpoint)
        ):
            raise TypeError(
                f"{path}: an EntryRoute takes (request, entry) and Authorized only, async"
            )

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        standard = super().get_route_handler()
        # Included in a router or app: FastAPI builds the handler once per inclusion, under a
        # context that carries the dependencies added there (a private FastAPI name: absent,
        # only the route's own count, and those were checked in __init__).
        context_var = getattr(fastapi.routing, "_effective_route_context_var", None)
        context = context_var.get() if context_var is not None else None
        if context is not None and _dependency_calls(context) != {authorize, get_entry}:
            return standard
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            app = request.app
            if app.state.settings.otel or app.dependency_overrides:
                return await standard(request)
            response: Response = await endpoint(request, await _entry_of(request))
            return response

        return handler
