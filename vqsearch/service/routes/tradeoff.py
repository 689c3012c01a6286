"""Accuracy against speed for one bank: start a sweep, read the measured curve."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from vqsearch.index import check_spec

from .. import _sweeps
from .._deps import VERSION_HEADER, EntryDep, Reads, RegistryDep, SettingsDep, Writes
from .._errors_doc import ERRORS
from .._params import TradeoffParams, array_field, body_doc
from .._wire import decode

router = APIRouter(prefix="/v1/banks", tags=["tradeoff"], responses=ERRORS)


@router.post(
    "/{name}/tradeoff",
    dependencies=Writes,
    status_code=202,
    summary="Measure recall and speed of the bank's approximate settings (background)",
    openapi_extra=body_doc(
        {
            "queries": "(nq, d) evaluation queries, optional",
            "specs": "other faiss specs",
            "n_queries": "int",
            "batch_sizes": "[int]",
            "min_seconds": "float",
        },
        "queries",
    ),
)
async def start_tradeoff(
    request: Request,
    entry: EntryDep,
    registry: RegistryDep,
    settings: SettingsDep,
    params: Annotated[TradeoffParams, Query()],
) -> JSONResponse:
    """Sweeps the bank's own index (building the default spec first if it has none) over its
    search parameters against exact search, plus any `specs` given (built temporarily). Queries:
    the body's, else the bank's recorded real queries (`VQSEARCH_QUERY_RESERVOIR`), else bank
    vectors perturbed at their nearest-neighbour scale. Follow `GET .../tradeoff`."""
    has_body = request.headers.get("content-type") is not None
    body = await decode(request, settings.max_body_bytes, "queries") if has_body else {}
    p = params.merged(body, ("queries",))
    queries = array_field(body, "queries", required=False)
    if queries is not None and (queries.ndim != 2 or queries.shape[1] != entry.bank.d):
        raise HTTPException(422, f"queries must be (nq, {entry.bank.d}); got {queries.shape}")
    if entry.bank.ntotal < 10:
        raise HTTPException(409, "a sweep needs at least 10 vectors in the bank")
    for spec in p.specs:
        check_spec(spec, entry.bank.d, entry.bank.metric)
    job = _sweeps.start(
        registry,
        entry,
        queries=queries,
        specs=tuple(p.specs),
        n_queries=p.n_queries,
        batch_sizes=tuple(p.batch_sizes),
        min_seconds=p.min_seconds,
        device=settings.device,
    )
    return JSONResponse(job, status_code=202, headers={VERSION_HEADER: entry.version})


@router.get(
    "/{name}/tradeoff", dependencies=Reads, summary="The last measured accuracy/speed curve"
)
async def get_tradeoff(entry: EntryDep) -> JSONResponse:
    """`state` and `progress` of the sweep, and `report`: every point with 1-recall@1,
    10-recall@10, QPS and p50/p99 latency per batch size, build time, bytes per vector and
    whether it is on the Pareto frontier, with the conditions it was measured under."""
    body: dict[str, Any] = {**entry.sweep, "report": entry.tradeoff}
    return JSONResponse(body, headers={VERSION_HEADER: entry.version})
