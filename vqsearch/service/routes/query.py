"""Queries: top-k search, nearest code (tokenize), decode (codes back to vectors)."""

from __future__ import annotations

import math

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from vqsearch._wire_names import SETTING_HEADER

from .._budget import take
from .._deps import VERSION_HEADER, EntryDep, EntryRoute, Reads
from .._entry import Entry
from .._errors_doc import ARRAYS, ERRORS
from .._params import (
    DecodeParams,
    NearestParams,
    SearchParams,
    array_field,
    body_doc,
    from_query,
    query_doc,
)
from .._searching import run_query
from .._setting import Setting
from .._settings import Settings
from .._wire import check_answer, decode, respond

router = APIRouter(
    prefix="/v1/banks",
    tags=["search"],
    dependencies=Reads,  # search, nearest and decode read
    responses=ERRORS,
    route_class=EntryRoute,
)


def _rows(n: int, settings: Settings) -> None:
    if n > settings.max_queries:
        raise HTTPException(
            422, f"{n} vectors exceed the limit of {settings.max_queries} per request"
        )


def _observe(request: Request, entry: Entry, rows: int, setting: Setting) -> None:
    request.state.rows = rows
    request.app.state.metrics.searched(request.scope["route"].path, entry.name, setting, rows)


def _headers(entry: Entry, setting: Setting) -> dict[str, str]:
    """Which setting answered: `exact`, or the spec with its search parameters."""
    return {VERSION_HEADER: entry.version, SETTING_HEADER: setting.label}


def _axis(axis: int | None, ndim: int) -> int:
    if axis is None:
        return ndim - 1
    if not -ndim <= axis < ndim:
        raise HTTPException(422, f"channel_axis={axis} is out of range for {ndim} axes")
    return axis % ndim


@router.post(
    "/{name}/search",
    responses={200: ARRAYS},
    summary="Top-k neighbours of each query",
    openapi_extra=body_doc(
        {"queries": "(nq, d) numbers", "k": "int", "mode": "exact|approx"}, "queries"
    )
    | query_doc(SearchParams),
)
async def search(
    request: Request,
    entry: EntryDep,
) -> Response:
    """Answers `ids` (nq, k) int64 and `distances` (nq, k) float32 (l2: squared distances,
    ip and cosine: similarities), nearest first; as JSON or an `.npz` of the two arrays. In
    approx mode an id of -1 (distance null in JSON) means fewer than k were found."""
    settings = request.app.state.settings
    params = from_query(SearchParams, request)
    body = await decode(request, settings.max_body_bytes, "queries")
    p = params.merged(body, ("queries",))
    xq = array_field(body, "queries", d=entry.bank.d)
    _rows(len(xq) if xq.ndim else 1, settings)
    if p.k > settings.max_k:
        raise HTTPException(422, f"k={p.k} exceeds the limit of {settings.max_k}")
    n = (len(xq) if xq.ndim else 1) * p.k
    answer = {"ids": (n, 8), "distances": (n, 4)}
    check_answer(request, settings.max_answer_bytes, answer, "fewer queries or a smaller k")
    take(request, 16 * n, "the search's float64 results")
    D, I, setting = await run_query(request, entry, xq, p, p.k, "recall_10_at_10")
    _observe(request, entry, len(D), setting)
    meta = {"mode": p.mode, "setting": setting.to_json()}
    return await respond(request, {"ids": I, "distances": D}, meta, _headers(entry, setting))


def _flatten(z: np.ndarray, channel_axis: int | None) -> tuple[np.ndarray, int]:
    """(..., d) or channel-axis layouts -> (n, d) rows, and the vector axis."""
    if z.ndim < 1:
        raise HTTPException(422, "queries must have at least one axis (the vector axis)")
    axis = _axis(channel_axis, z.ndim)
    zl = z if axis == z.ndim - 1 else np.moveaxis(z, axis, -1)
    return zl.reshape(math.prod(zl.shape[:-1]), zl.shape[-1]), axis  # -1 fails on size 0


def _finish_nearest(
    entry: Entry, z: np.ndarray, flat: np.ndarray, axis: int, I: np.ndarray, p: NearestParams
) -> dict[str, np.ndarray]:
    """Codes in the input's leading shape, plus z_q and errors when asked."""
    codes = I[:, 0]
    if (codes < 0).any():
        raise HTTPException(
            409, "the approximate index found no code for some vectors; raise nprobe"
        )
    # ids are int64 already: only a narrower dtype needs the check (and np.iinfo's cost)
    if p.codes_dtype != "int64" and len(codes) and int(codes.max()) > np.iinfo(p.codes_dtype).max:
        raise HTTPException(422, f"codes_dtype={p.codes_dtype} cannot hold code {int(codes.max())}")
    lead = z.shape[:axis] + z.shape[axis + 1 :]
    out = {"codes": codes.astype(p.codes_dtype).reshape(lead)}
    if p.return_quantized or p.return_error:
        zq = entry.bank.get(codes)
        if p.return_error:
            err = ((flat.astype(np.float64) - zq) ** 2).sum(1)
            out["errors"] = err.astype(np.float32).reshape(lead)
        if p.return_quantized:
            out["quantized"] = np.moveaxis(zq.reshape(*lead, entry.bank.d), -1, axis)
    return out


@router.post(
    "/{name}/nearest",
    responses={200: ARRAYS},
    summary="Nearest code of every vector (vector-quantizer tokenization)",
    openapi_extra=body_doc(
        {"queries": "(..., d) numbers, or (B, C, H, W) with channel_axis=1"}, "queries"
    )
    | query_doc(NearestParams),
)
async def nearest(
    request: Request,
    entry: EntryDep,
) -> Response:
    """`codes` keep the leading shape: (..., d) -> (...); with `channel_axis` that axis is the
    vector axis, so (B, C, H, W) -> (B, H, W). Optionally `quantized` (z_q, the input's layout)
    and `errors` (||z - z_q||^2, float32). One array answers as `.npy`, several as `.npz`."""
    settings = request.app.state.settings
    params = from_query(NearestParams, request)
    body = await decode(request, settings.max_body_bytes, "queries")
    p = params.merged(body, ("queries",))
    z = array_field(body, "queries", d=entry.bank.d)
    flat, axis = _flatten(z, p.channel_axis)  # a view, or a copy the body size bounds
    _rows(len(flat), settings)
    n, d, width = len(flat), entry.bank.d, np.dtype(p.codes_dtype).itemsize
    answer = {"codes": (n, width)}
    if p.return_quantized:
        answer["quantized"] = (n * d, 4)
    if p.return_error:
        answer["errors"] = (n, 4)
    check_answer(request, settings.max_answer_bytes, answer, "fewer vectors")
    _, I, setting = await run_query(request, entry, flat, p, 1, "recall_1_at_1")
    if p.return_quantized or p.return_error:  # gathers and float64 sums: off the event loop
        out = await run_in_threadpool(_finish_nearest, entry, z, flat, axis, I, p)
    else:
        out = _finish_nearest(entry, z, flat, axis, I, p)
    _observe(request, entry, int(out["codes"].size), setting)
    if entry.usage is not None:
        entry.usage.record(out["codes"])
    meta = {"mode": p.mode, "setting": setting.to_json()}
    return await respond(request, out, meta, _headers(entry, setting))


def _decode(entry: Entry, codes: np.ndarray, p: DecodeParams) -> np.ndarray:
    if codes.dtype.kind == "f" and not np.array_equal(codes, np.round(codes)):
        raise HTTPException(422, "codes must be integers")
    vectors = entry.bank.get(codes.astype(np.int64))
    return np.moveaxis(vectors, -1, _axis(p.channel_axis, vectors.ndim))


@router.post(
    "/{name}/decode",
    responses={200: ARRAYS},
    summary="Codes of any shape back to their vectors",
    openapi_extra=body_doc({"codes": "integer ids of any shape"}, "codes")
    | query_doc(DecodeParams),
)
async def decode_codes(
    request: Request,
    entry: EntryDep,
) -> Response:
    """`vectors` of shape codes.shape + (d,), or with `channel_axis` the d axis put there
    ((B, H, W) codes with channel_axis=1 -> (B, d, H, W) latents). Unknown codes: 422."""
    settings = request.app.state.settings
    params = from_query(DecodeParams, request)
    body = await decode(request, settings.max_body_bytes, "codes")
    p = params.merged(body, ("codes",))
    codes = array_field(body, "codes")
    _rows(int(codes.size), settings)
    answer = {"vectors": (int(codes.size) * entry.bank.d, 4)}
    check_answer(request, settings.max_answer_bytes, answer, "fewer codes")
    out = await run_in_threadpool(_decode, entry, codes, p)
    request.state.rows = int(codes.size)
    return await respond(request, {"vectors": out}, None, {VERSION_HEADER: entry.version})
