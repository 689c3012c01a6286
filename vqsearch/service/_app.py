"""The FastAPI application: state built in `lifespan`, engine errors mapped to HTTP answers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from vqsearch import __version__
from vqsearch.index import DuplicateIdError, InvalidInputError, StorageError

from ._observe import AdmissionMiddleware, Metrics, ObserveMiddleware, trim_periodically
from ._registry import (
    BankExistsError,
    LimitError,
    Limits,
    ReadOnlyError,
    Registry,
    UnknownBankError,
)
from ._searching import Batcher
from ._settings import Settings
from .routes import banks, health, query, tradeoff

log = logging.getLogger("vqsearch")
DEMO_NAME, DEMO_SHAPE, DEMO_SEED = "demo", (1024, 256), 0


def _error(status: int, detail: object) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _add_handlers(app: FastAPI) -> None:
    @app.exception_handler(UnknownBankError)
    async def _404(_: Request, exc: Exception) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(BankExistsError)
    @app.exception_handler(DuplicateIdError)
    async def _409(_: Request, exc: Exception) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(ReadOnlyError)
    async def _405(_: Request, exc: Exception) -> JSONResponse:
        return _error(405, str(exc))

    @app.exception_handler(LimitError)
    @app.exception_handler(InvalidInputError)
    async def _422(_: Request, exc: Exception) -> JSONResponse:
        return _error(422, f"{type(exc).__name__}: {exc}")

    @app.exception_handler(ValidationError)
    async def _422_params(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ValidationError)
        return _error(422, exc.errors(include_url=False, include_context=False))

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: Exception) -> JSONResponse:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return _error(507, f"out of disk space; nothing was written: {exc}")
        log.error("storage error: %s", exc)
        return _error(500, f"storage error: {exc}")

    @app.exception_handler(RequestValidationError)
    async def _422_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _error(
            422, [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
        )


async def _follow(registry: Registry, settings: Settings) -> None:
    """A read-only replica re-reads the data dir the primary writes to."""
    while True:
        await asyncio.sleep(settings.refresh_seconds)
        await run_in_threadpool(registry.refresh)


def demo_codebook() -> np.ndarray:
    """The seeded demo codebook (1024 x 256): what `make run` serves on an empty data dir."""
    return np.random.default_rng(DEMO_SEED).standard_normal(DEMO_SHAPE, dtype=np.float32)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = Limits(settings.max_d, settings.max_bank_vectors, settings.max_banks)
        registry = Registry(
            settings.data_dir,
            settings.auto_rebuild,
            settings.read_only,
            settings.query_reservoir,
            settings.usage_window,
            limits,
        )
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
        registry.load()
        if settings.demo and not registry.entries and not settings.read_only:
            registry.create(DEMO_NAME, DEMO_SHAPE[1], "l2", demo_codebook(), None)
            log.info("created the demo codebook %r %s", DEMO_NAME, DEMO_SHAPE)
        log.info("serving %d banks from %s", len(registry.entries), settings.data_dir)
        follow = asyncio.create_task(_follow(registry, settings)) if settings.read_only else None
        trimmer = asyncio.create_task(trim_periodically())
        try:
            yield
        finally:
            trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trimmer
            if follow is not None:
                follow.cancel()
            registry.close()

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
    app.add_middleware(AdmissionMiddleware, max_inflight=settings.max_inflight)
    app.add_middleware(ObserveMiddleware, metrics=app.state.metrics)
    # The hot routes first: a request is matched against the routes in order.
    app.include_router(query.router)
    app.include_router(health.router)
    app.include_router(banks.router)
    app.include_router(tradeoff.router)
    return app
