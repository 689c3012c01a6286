"""Error answers in their one shape, built here for the app and the admission middleware, and
documented in the OpenAPI schema: `{"detail": str, "errors": [{"loc", "msg", "type"}]}`."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pydantic import BaseModel


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str  # one message naming the problem
    errors: list[ErrorItem]  # one entry per problem, located where a field is at fault


def error_body(
    detail: str, errors: list[dict[str, Any]] | None = None, kind: str = "error"
) -> dict[str, Any]:
    return {"detail": detail, "errors": errors or [{"loc": [], "msg": detail, "type": kind}]}


def status_kind(status: int) -> str:
    """The `type` of an error known by its status only: its phrase, snake-cased."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:  # 499, client closed the request: no standard name
        phrase = "client closed request"
    return phrase.lower().replace(" ", "_").replace("-", "_")


_WHY = {
    400: "unreadable body",
    408: "body not sent within VQSEARCH_BODY_TIMEOUT",
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
