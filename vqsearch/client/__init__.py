"""Python client for the vqsearch service: needs only httpx and numpy (torch tensors accepted
without importing torch). `AsyncClient` and `Client` have the same methods."""

from ._async import AsyncClient
from ._core import NearestResult, SearchResult
from ._exceptions import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PreconditionFailedError,
    ServerError,
    ServiceUnavailableError,
    TransportError,
    UnprocessableError,
    UnsupportedMediaTypeError,
    VQSearchClientError,
)
from ._sync import Client

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "JobFailedError",
    "JobTimeoutError",
    "NearestResult",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "SearchResult",
    "ServerError",
    "ServiceUnavailableError",
    "TransportError",
    "UnprocessableError",
    "UnsupportedMediaTypeError",
    "VQSearchClientError",
]
