"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .._deps import MetricsAccess, Open, RegistryDep

router = APIRouter(tags=["health"])


@router.get("/healthz", dependencies=Open, summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    dependencies=Open,
    summary="Banks are loaded and queries can be served",
    responses={503: {"description": "still loading"}},
)
async def readyz(registry: RegistryDep) -> JSONResponse:
    if not registry.loaded:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "banks": len(registry.entries)})


@router.get(
    "/metrics",
    dependencies=MetricsAccess,
    summary="Prometheus metrics",
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        401: {"description": "a key is needed (VQSEARCH_METRICS_PUBLIC=0)"},
    },
)
async def metrics(request: Request) -> Response:
    """Requests and latency per route and status, search batch sizes, rows searched, and per
    bank: vectors, bytes, index build progress, code perplexity and dead codes."""
    return Response(generate_latest(request.app.state.metrics.prom), media_type=CONTENT_TYPE_LATEST)
