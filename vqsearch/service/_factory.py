"""`app()` for uvicorn's `--factory` with several workers: each builds its own app."""

from fastapi import FastAPI

from ._app import create_app


def app() -> FastAPI:
    return create_app()
