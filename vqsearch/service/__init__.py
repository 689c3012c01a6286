"""The HTTP service: FastAPI routes over `vqsearch.index` banks stored in a data directory."""

from ._app import create_app, demo_codebook
from ._settings import Settings
from ._shards import Placement, ShardSet, ShardsUnavailableError

__all__ = [
    "Placement",
    "Settings",
    "ShardSet",
    "ShardsUnavailableError",
    "create_app",
    "demo_codebook",
]
