"""The HTTP service: FastAPI routes over `vqsearch.index` banks stored in a data directory."""

from ._app import create_app, demo_codebook
from ._forward import Forwarded, LocalWriter, WriterAnswer, WriterUnavailableError
from ._settings import Settings
from ._shards import Placement, ShardSet, ShardsUnavailableError

__all__ = [
    "Forwarded",
    "LocalWriter",
    "Placement",
    "Settings",
    "ShardSet",
    "ShardsUnavailableError",
    "WriterAnswer",
    "WriterUnavailableError",
    "create_app",
    "demo_codebook",
]
