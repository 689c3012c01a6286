"""`app()` for uvicorn's `--factory` with several workers: each builds its own app."""

from fastapi import FastAPI

from ._app import create_app
from ._observe import configure_logging, return_freed_memory
from ._settings import Settings


def app() -> FastAPI:
    # per worker process: neither mallopt nor logging set-up crosses the spawn
    return_freed_memory()
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
