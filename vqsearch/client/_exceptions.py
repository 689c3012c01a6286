"""Client exceptions. Every failure of a call is one of these::

VQSearchClientError
├── TransportError                 no HTTP answer: connection refused, reset, timed out
├── ResponseFormatError            a success answer this client cannot read
└── APIError                       the server answered with an error status
    ├── BadRequestError            400  unreadable body
    ├── AuthenticationError        401  no or unknown API key
    ├── PermissionDeniedError      403  key of the wrong role
    ├── NotFoundError              404  unknown bank or route
    ├── ConflictError              409  bank exists, duplicate ids, index not ready
    ├── PreconditionFailedError    412  the bank changed since the pinned version
    ├── PayloadTooLargeError       413  body over the server's limit
    ├── UnsupportedMediaTypeError  415
    ├── UnprocessableError         422  wrong d, rank, NaN, k, ids, parameters
    ├── ServiceUnavailableError    503  overloaded (retried by idempotent calls)
    └── ServerError                5xx  anything else the server failed at
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "JobFailedError",
    "JobTimeoutError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "ResponseFormatError",
    "ServerError",
    "ServiceUnavailableError",
    "TransportError",
    "UnprocessableError",
    "UnsupportedMediaTypeError",
    "VQSearchClientError",
]

BODY_LIMIT = 2000


class VQSearchClientError(Exception):
    """Base of every client error. `added`: when an `add` sent in several appends failed
    part-way, the ids of the rows added before the failure (durable; None otherwise)."""

    added: Any = None


class TransportError(VQSearchClientError):
    """The request got no HTTP answer."""


class ResponseFormatError(VQSearchClientError):
    """A success status whose body is not what this client reads (not JSON, a field it needs
    missing or of another type): a server of another API version, or not a vqsearch server."""


class JobFailedError(VQSearchClientError):
    """A background job (index build, tradeoff sweep) ended in failure."""


class JobTimeoutError(VQSearchClientError, TimeoutError):
    """A wait for a background job ran out of time."""


class APIError(VQSearchClientError):
    """An error status, with the server's `detail`, the (truncated) body and the request's id
    (`X-Request-ID`, as the server logged it) kept."""

    def __init__(
        self, status: int, detail: object, body: str, request_id: str | None = None
    ) -> None:
        self.status, self.detail, self.request_id = status, detail, request_id
        self.body = body[:BODY_LIMIT]
        super().__init__(f"{status}: {detail}")


class BadRequestError(APIError): ...


class AuthenticationError(APIError): ...


class PermissionDeniedError(APIError): ...


class NotFoundError(APIError): ...


class ConflictError(APIError): ...


class PreconditionFailedError(APIError): ...


class PayloadTooLargeError(APIError): ...


class UnsupportedMediaTypeError(APIError): ...


class UnprocessableError(APIError): ...


class ServiceUnavailableError(APIError): ...


class ServerError(APIError): ...


BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    412: PreconditionFailedError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: UnprocessableError,
    503: ServiceUnavailableError,
}


def error_for(status: int, detail: object, body: str, request_id: str | None = None) -> APIError:
    cls = BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    return cls(status, detail, body, request_id)
