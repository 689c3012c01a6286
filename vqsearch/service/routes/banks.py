"""Banks: create, list, inspect, delete; append and delete vectors; build the approximate index."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from vqsearch.index import check_spec

from .._deps import (
    VERSION_HEADER,
    BankName,
    EntryDep,
    Reads,
    RegistryDep,
    SettingsDep,
    Writes,
)
from .._errors_doc import ARRAYS, ERRORS
from .._params import CreateParams, IndexParams, array_field, body_doc
from .._wire import decode, respond

router = APIRouter(prefix="/v1/banks", tags=["banks"], responses=ERRORS)

VECTORS_DOC = body_doc(
    {"vectors": "(n, d) numbers", "ids": "(n,) integer ids >= 0, optional"}, "vectors"
)


def _versioned(entry: Any) -> dict[str, str]:
    return {VERSION_HEADER: entry.version}


def _check_rows(a: np.ndarray | None, settings: Any) -> None:
    if a is not None and a.ndim >= 1 and len(a) > settings.max_queries:
        raise HTTPException(
            422, f"{len(a)} vectors exceed the limit of {settings.max_queries} per request"
        )


@router.get("", dependencies=Reads, summary="List banks")
async def list_banks(registry: RegistryDep) -> list[dict[str, Any]]:
    return [e.info() for e in registry.list()]


@router.put(
    "/{name}",
    dependencies=Writes,
    status_code=201,
    summary="Create a bank",
    openapi_extra=VECTORS_DOC,
)
async def create_bank(
    name: BankName,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    params: Annotated[CreateParams, Query()],
) -> JSONResponse:
    """Create from vectors (JSON `{"vectors", "ids", "metric"}`, or `.npy` / `.npz` with the
    metric in the query string), or empty with `d`. 409 if the bank exists."""
    body = await decode(request, settings.max_body_bytes, "vectors")
    p = params.merged(body, ("vectors", "ids"))
    vectors, ids = array_field(body, "vectors", required=False), array_field(body, "ids", False)
    _check_rows(vectors, settings)
    if vectors is None and p.d is None:
        raise HTTPException(422, "give 'vectors' or, for an empty bank, 'd'")
    if vectors is not None and vectors.ndim != 2:
        raise HTTPException(422, f"vectors must be 2-D (n, d); got shape {vectors.shape}")
    d = p.d if vectors is None else vectors.shape[1]
    if p.d is not None and d != p.d:
        raise HTTPException(422, f"d={p.d} was given, but the vectors have d={d}")
    entry = await run_in_threadpool(registry.create, name, d, p.metric, vectors, ids, p.shards)
    return JSONResponse(entry.info(), status_code=201, headers=_versioned(entry))


@router.get("/{name}", dependencies=Reads, summary="Describe a bank and its approximate index")
async def get_bank(entry: EntryDep) -> JSONResponse:
    return JSONResponse(entry.info(), headers=_versioned(entry))


@router.delete("/{name}", dependencies=Writes, summary="Delete a bank and its files")
async def delete_bank(name: BankName, registry: RegistryDep) -> dict[str, str]:
    registry.get(name)
    await run_in_threadpool(registry.delete, name)
    return {"deleted": name}


@router.post(
    "/{name}/vectors",
    dependencies=Writes,
    summary="Append vectors",
    openapi_extra=VECTORS_DOC,
    responses={200: ARRAYS},
)
async def add_vectors(
    request: Request, entry: EntryDep, registry: RegistryDep, settings: SettingsDep
) -> Response:
    """Ids default to max id + 1 onwards; ids already in the bank are refused (409). Answers
    once the vectors are durable on disk, with the ids given to them."""
    body = await decode(request, settings.max_body_bytes, "vectors")
    vectors = array_field(body, "vectors", d=entry.bank.d)
    ids = array_field(body, "ids", required=False)
    _check_rows(vectors, settings)
    added = await run_in_threadpool(registry.add, entry, vectors, ids)
    request.state.rows = len(added)
    return await respond(request, {"ids": added}, {"count": len(added)}, _versioned(entry))


@router.delete(
    "/{name}/vectors",
    dependencies=Writes,
    summary="Delete vectors by id",
    openapi_extra=body_doc({"ids": "(n,) integer ids"}, "ids"),
)
async def remove_vectors(
    request: Request, entry: EntryDep, registry: RegistryDep, settings: SettingsDep
) -> JSONResponse:
    """All or nothing: 422 naming the ids the bank does not hold."""
    body = await decode(request, settings.max_body_bytes, "ids")
    ids = array_field(body, "ids")
    removed = await run_in_threadpool(registry.remove, entry, ids)
    return JSONResponse({"removed": removed}, headers=_versioned(entry))


@router.put(
    "/{name}/index",
    dependencies=Writes,
    status_code=202,
    summary="Build the approximate index in the background",
    openapi_extra=body_doc({"spec": "faiss index_factory string", "train_size": "int"}, "spec"),
)
async def build_index(
    request: Request,
    entry: EntryDep,
    registry: RegistryDep,
    settings: SettingsDep,
    params: Annotated[IndexParams, Query()],
) -> JSONResponse:
    """202 at once; follow `index.state` in the bank info (queued, training, saving, ready,
    failed, or stale after a write). Queries never wait for a build; `mode=approx` answers 409
    until the index is ready."""
    has_body = request.headers.get("content-type") is not None
    body = await decode(request, settings.max_body_bytes, "spec") if has_body else {}
    p = params.merged(body, ())
    bank = entry.bank
    if bank.ntotal == 0:
        raise HTTPException(409, f"bank {entry.name!r} is empty: nothing to index")
    spec = p.spec or registry.default_spec(entry)
    # What can be known now is a 422 now, not a failed build later: the spec's sizes against
    # the bank's (read from the text, before faiss allocates), then faiss's own parse.
    kw = {} if p.train_size is None else {"train_size": p.train_size}
    rows = entry.index_rows  # on a cluster each shard trains its own: the smallest's rows
    await run_in_threadpool(check_spec, spec, bank.d, bank.metric, rows, **kw)
    state = registry.build_index(entry, spec, p.train_size)
    return JSONResponse(state.info(None), status_code=202, headers=_versioned(entry))


@router.get(
    "/{name}/usage",
    dependencies=Reads,
    summary="How often each code was served (the usage window)",
    responses={200: ARRAYS},
)
async def usage(request: Request, entry: EntryDep) -> Response:
    """`ids` and `counts` over the last codes served by `nearest` (VQSEARCH_USAGE_WINDOW), with
    perplexity and dead codes: a codebook's health as VQ training tracks it."""
    if entry.usage is None:
        raise HTTPException(409, "usage tracking is off (VQSEARCH_USAGE_WINDOW=0)")
    ids, counts = entry.usage.counts()
    summary = entry.usage.summary(entry.bank.ids())
    return await respond(request, {"ids": ids, "counts": counts}, summary, _versioned(entry))
