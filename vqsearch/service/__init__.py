"""The HTTP service: FastAPI routes over `vqsearch.index` banks stored in a data directory."""

from ._app import create_app, demo_codebook
from ._settings import Settings

__all__ = ["Settings", "create_app", "demo_codebook"]
