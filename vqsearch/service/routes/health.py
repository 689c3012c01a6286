"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .._deps import RegistryDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Banks are loaded and queries can be served")
async def readyz(registry: RegistryDep) -> JSONResponse:
    if not registry.loaded:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "banks": len(registry.entries)})
