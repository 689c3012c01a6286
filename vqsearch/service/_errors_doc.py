"""Error answers as the OpenAPI schema documents them: `{"detail": ...}` for every status."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    detail: Any


_WHY = {
    400: "unreadable body",
    401: "no or unknown API key",
    403: "API key of the wrong role",
    404: "unknown bank",
    405: "read-only replica",
    409: "conflict (exists, duplicate ids, not ready)",
    412: "bank changed since the If-Match version",
    413: "body over the limit",
    415: "unsupported Content-Type",
    422: "invalid input, named in detail",
    503: "overloaded: retry after Retry-After seconds",
    507: "out of disk space",
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why} for code, why in _WHY.items()
}
ARRAYS = {
    "content": {"application/json": {}, "application/x-npy": {}, "application/x-npz": {}},
    "description": "JSON, or .npy (one array) / .npz (several), following Accept",
}
