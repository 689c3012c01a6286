"""The names client and server agree on: media types, headers, paths, body fields, job states.

Standard library only: `vqsearch.client` (httpx and numpy) and `vqsearch.service` (FastAPI)
both import it, and neither may pull the other's dependencies in through it.

Header names are in their canonical spelling; HTTP compares them case-insensitively (httpx and
Starlette header lookups do too), but raw ASGI headers are lower-case bytes: compare those with
`name.lower().encode()`.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "ACCEPT_HEADER",
    "API_PREFIX",
    "AUTHORIZATION_HEADER",
    "BEARER",
    "BINARY",
    "CODES_FIELD",
    "CONTENT_TYPE_HEADER",
    "DECODE_ROUTE",
    "DISTANCES_FIELD",
    "ERRORS_FIELD",
    "HEALTH_PATH",
    "IDS_FIELD",
    "IF_MATCH_HEADER",
    "INDEX_ROUTE",
    "JSON",
    "MEDIA_TYPES",
    "METRICS_PATH",
    "NEAREST_ROUTE",
    "NPY",
    "NPZ",
    "OCTET_STREAM",
    "QUANTIZED_FIELD",
    "QUERIES_FIELD",
    "READY_PATH",
    "REQUEST_ID_HEADER",
    "RETRY_AFTER_HEADER",
    "SEARCH_ROUTE",
    "SETTING_HEADER",
    "TRADEOFF_ROUTE",
    "USAGE_ROUTE",
    "VECTORS_FIELD",
    "VECTORS_ROUTE",
    "VERSION_HEADER",
    "IndexPhase",
    "SweepPhase",
    "WireEnum",
    "bank_path",
]

# -- media types ---------------------------------------------------------------------------------

NPY = "application/x-npy"  # one array, NumPy's .npy format
NPZ = "application/x-npz"  # several named arrays, an uncompressed .npz
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"  # read as .npy
BINARY = (NPY, NPZ, OCTET_STREAM)  # the binary (non-JSON) media types
MEDIA_TYPES = (JSON, NPY, NPZ, OCTET_STREAM)  # every request body media type the server reads

# -- headers -------------------------------------------------------------------------------------

VERSION_HEADER = "X-Vqsearch-Bank-Version"  # on every bank answer: `<content hash>-<generation>`
SETTING_HEADER = "X-Vqsearch-Setting"  # which setting answered a query: `exact`, or `spec;k=v`
REQUEST_ID_HEADER = "X-Request-ID"  # the caller's id, else the server's; echoed on the answer
IF_MATCH_HEADER = "If-Match"  # pins a request to a bank version (412 when it changed)
RETRY_AFTER_HEADER = "Retry-After"  # seconds, on a 503
AUTHORIZATION_HEADER = "Authorization"  # `Bearer <API key>`
BEARER = "Bearer"  # the authorization scheme (compared case-insensitively)
CONTENT_TYPE_HEADER = "Content-Type"
ACCEPT_HEADER = "Accept"

# -- paths ---------------------------------------------------------------------------------------

API_PREFIX = "/v1/banks"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
# what follows `{API_PREFIX}/{name}/`
VECTORS_ROUTE = "vectors"
SEARCH_ROUTE = "search"
NEAREST_ROUTE = "nearest"
DECODE_ROUTE = "decode"
INDEX_ROUTE = "index"
TRADEOFF_ROUTE = "tradeoff"
USAGE_ROUTE = "usage"


def bank_path(name: str, route: str = "") -> str:
    """`/v1/banks/{name}`, or `/v1/banks/{name}/{route}`."""
    return f"{API_PREFIX}/{name}/{route}" if route else f"{API_PREFIX}/{name}"


# -- array fields of request bodies and answers (JSON keys, .npz member names) -------------------

QUERIES_FIELD = "queries"
VECTORS_FIELD = "vectors"
IDS_FIELD = "ids"
CODES_FIELD = "codes"
DISTANCES_FIELD = "distances"
QUANTIZED_FIELD = "quantized"
ERRORS_FIELD = "errors"

# -- states of background jobs ------------------------------------------------------------------


class WireEnum(str, Enum):
    """A state that is its value everywhere: JSON, ==, str() and f-strings."""

    def __str__(self) -> str:
        return str(self.value)


class IndexPhase(WireEnum):
    """Where a bank's approximate index is, as `index.state` reports it."""

    QUEUED = "queued"
    TRAINING = "training"
    SAVING = "saving"
    READY = "ready"  # the index serves the bank's current version
    STALE = "stale"  # it served an earlier version; no build of this one is under way
    FAILED = "failed"


class SweepPhase(WireEnum):
    """Where a bank's tradeoff sweep is, as the tradeoff job's `state` reports it."""

    NONE = "none"
    QUEUED = "queued"
    BUILDING = "building index"
    MEASURING = "measuring"
    DONE = "done"
    FAILED = "failed"
