"""The FastAPI application: state built in `lifespan`, engine errors mapped to HTTP answers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vqsearch import __version__
from vqsearch.index import DuplicateIdError, InvalidInputError, StorageError

from ._admission import AdmissionMiddleware
from ._budget import Budget
from ._deps import add_fast_routes, check_access, write_routes
from ._entry import (
    BankExistsError,
    LimitError,
    Limits,
    ReadOnlyError,
    UnknownBankError,
)
from ._errors_doc import error_body, status_kind
from ._forward import Forward, ForwardWrites
from ._memory import memory_limit
from ._observe import Metrics, ObserveMiddleware, trim_periodically
from ._registry import Registry
from ._searching import Batcher
from ._settings import Settings
from ._shards import RETRY_AFTER_S, ShardsUnavailableError
from .routes import banks, health, query, tradeoff

log = logging.getLogger("vqsearch")
DEMO_NAME, DEMO_SHAPE, DEMO_SEED = "demo", (1024, 256), 0


def _error(
    status: int,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    kind: str = "error",
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Every error answer, in its one shape (`_errors_doc.ErrorBody`)."""
    return JSONResponse(error_body(detail, errors, kind), status_code=status, headers=headers)


def _snake(exc: Exception) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def _field_errors(errors: Any) -> JSONResponse:
    """pydantic's or FastAPI's validation errors, their input left out (it can be a whole array,
    and an ndarray does not encode)."""
    items = [{"loc": list(e["loc"]), "msg": str(e["msg"]), "type": str(e["type"])} for e in errors]
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in items)
    return _error(422, detail or "invalid request", items)


def _add_handlers(app: FastAPI) -> None:
    @app.exception_handler(UnknownBankError)
    async def _404(_: Request, exc: Exception) -> JSONResponse:
        return _error(404, str(exc), kind=_snake(exc))

    @app.exception_handler(BankExistsError)
    @app.exception_handler(DuplicateIdError)
    async def _409(_: Request, exc: Exception) -> JSONResponse:
        return _error(409, str(exc), kind=_snake(exc))

    @app.exception_handler(ReadOnlyError)
    async def _405(_: Request, exc: Exception) -> JSONResponse:
        return _error(405, str(exc), kind=_snake(exc))

    @app.exception_handler(LimitError)
    @app.exception_handler(InvalidInputError)
    async def _422(_: Request, exc: Exception) -> JSONResponse:
        return _error(422, f"{type(exc).__name__}: {exc}", kind=_snake(exc))

    @app.exception_handler(ValidationError)
    async def _422_params(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ValidationError)
        return _field_errors(exc.errors(include_url=False, include_input=False))

    @app.exception_handler(RequestValidationError)
    async def _422_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _field_errors(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = status_kind(exc.status_code)
        return _error(exc.status_code, str(exc.detail), kind=kind, headers=exc.headers)

    @app.exception_handler(ShardsUnavailableError)
    async def _503(_: Request, exc: Exception) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return _error(503, str(exc), kind=_snake(exc), headers=headers)

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: Exception) -> JSONResponse:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return _error(507, f"out of disk space; nothing was written: {exc}", kind="disk_full")
        log.error("storage error: %s", exc)
        return _error(500, f"storage error: {exc}", kind=_snake(exc))

    @app.exception_handler(Exception)
    async def _500(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback and answers with this; the server keeps serving.
        rid = request.headers.get("x-request-id", "")
        return _error(500, f"internal error{f' (request {rid})' if rid else ''}", kind="internal")


async def _follow(registry: Registry, settings: Settings) -> None:
    """A read-only replica re-reads the data dir the primary writes to."""
    while True:
        await asyncio.sleep(settings.refresh_seconds)
        await run_in_threadpool(registry.refresh)


def demo_codebook() -> np.ndarray:
    """The seeded demo codebook (1024 x 256): what `make run` serves on an empty data dir."""
    return np.random.default_rng(DEMO_SEED).standard_normal(DEMO_SHAPE, dtype=np.float32)


def create_app(settings: Settings | None = None, forward: Forward | None = None) -> FastAPI:
    """The app serving `settings`. With `forward` it is a replica that serves reads and sends
    every write on to the writer through it (`_forward`; `settings.read_only` must be set)."""
    settings = settings or Settings()
    if forward is not None and not settings.read_only:
        raise ValueError("an app that forwards its writes is a read-only replica")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        check_access(app)  # every route, as served, declares who may call it
        limits = Limits(settings.max_d, settings.max_bank_vectors, settings.max_banks)
        cluster = None
        if settings.ray_address is not None:
            from vqsearch.ray import Cluster  # imported only here: Ray is an extra

            cluster = Cluster.connect(settings.ray_address, settings.ray_gpus, settings.ray_timeout)
        registry = Registry(
            settings.data_dir,
            settings.auto_rebuild,
            settings.read_only,
            settings.query_reservoir,
            settings.usage_window,
            limits,
            cluster,
            index_budget=int(settings.index_memory_fraction * memory_limit()),
        )
        registry.follow_writes = forward is not None
        if not settings.auth_enabled:
            log.warning(
                "no API keys set (VQSEARCH_READ_KEYS / VQSEARCH_ADMIN_KEYS): anyone who reaches "
                "%s:%s may read and write",
                settings.host,
                settings.port,
            )
        app.state.settings, app.state.registry = settings, registry
        if torch.cuda.is_available():
            # bf16 GEMMs with bf16 split-K partial sums break the bound that keeps a bf16
            # candidate scan exact (vqsearch/index/_precision.py); this process is ours.
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        registry.load()  # a writer takes the data dir's lock here, released by close()
        follow = trimmer = None
        try:
            if settings.demo and not registry.entries and not settings.read_only:
                registry.create(DEMO_NAME, DEMO_SHAPE[1], "l2", demo_codebook(), None)
                log.info("created the demo codebook %r %s", DEMO_NAME, DEMO_SHAPE)
            log.info("serving %d banks from %s", len(registry.entries), settings.data_dir)
            if settings.read_only:
                follow = asyncio.create_task(_follow(registry, settings))
            trimmer = asyncio.create_task(trim_periodically())
            yield
        finally:
            for task in (trimmer, follow):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            registry.close()
            if cluster is not None:
                cluster.close()

    otel = settings.otel
    app = FastAPI(
        title="vqsearch",
        version=__version__,
        lifespan=lifespan,
        telemetry={"tracing": otel, "metrics": otel, "logs": otel},
        description=(
            "Nearest-neighbour search for codebooks and embedding banks. Bodies are JSON "
            "(nested lists) or NumPy binary: one `.npy` array (`application/x-npy`) or several "
            "in an `.npz` (`application/x-npz`); answers follow `Accept`, else the request's "
            "format. Every bank answer carries `X-Vqsearch-Bank-Version`; pin it with `If-Match`."
        ),
    )
    _add_handlers(app)
    app.state.batcher = Batcher(settings.batch_max_rows, settings.batch_max_wait_ms / 1e3)
    app.state.metrics = Metrics(
        lambda: getattr(app.state, "registry", None), lambda: app.state.batcher.waiting_rows
    )
    app.state.budget = Budget(settings.memory_budget)
    if forward is not None:  # inside the admission limits, which hold for forwarded bodies too
        app.add_middleware(ForwardWrites, forward=forward, writes=lambda: write_routes(app))
    app.add_middleware(
        AdmissionMiddleware,
        max_inflight=settings.max_inflight,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout,
        budget=app.state.budget,
    )
    app.add_middleware(ObserveMiddleware, metrics=app.state.metrics)
    # The hot routes first: a request is matched against the routes in order.
    app.include_router(query.router)
    app.include_router(health.router)
    app.include_router(banks.router)
    app.include_router(tradeoff.router)
    if not otel:  # FastAPI's spans wrap its dependency solver, which the fast routes skip
        add_fast_routes(app)  # search, nearest, decode: plain Starlette routes before them
    return app
