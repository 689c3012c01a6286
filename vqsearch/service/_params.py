"""Request parameters and bodies, as pydantic models (they also document the API)."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vqsearch.index import as_tensor

Mode = Literal["exact", "approx", "auto"]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def merged(self, body: dict[str, Any], arrays: tuple[str, ...]) -> Any:
        """These parameters (from the query string) with the body's own fields (JSON, or 0-d
        .npz members). 422 for a field the route does not take, and for a parameter given in
        both places (neither silently wins)."""
        fields = {k: v for k, v in body.items() if k not in arrays}
        if not fields:  # a binary body holds arrays only
            return self
        known = type(self).model_fields
        unknown = [k for k in fields if k not in known]
        if unknown:
            takes = ", ".join((*arrays, *known))
            raise HTTPException(
                422, f"unknown field {_names(unknown)} in the body; this route takes: {takes}"
            )
        twice = [k for k in fields if k in self.model_fields_set]
        if twice:
            raise HTTPException(
                422, f"{_names(twice)} given in both the query string and the body: give it once"
            )
        try:
            return type(self).model_validate(self.model_dump(exclude_unset=True) | fields)
        except ValidationError as exc:
            raise RequestValidationError(_located(exc, "body")) from exc


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _located(exc: ValidationError, where: str) -> list[dict[str, Any]]:
    """pydantic's errors under FastAPI's location (where, name), without the input (which can
    be a whole array, and an ndarray does not encode)."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    return [{**e, "loc": (where, *e["loc"])} for e in errors]


class SearchParams(_Params):
    k: int = Field(10, ge=1, description="neighbours per query")
    mode: Mode = Field(
        "exact",
        description="exact (float64-exact), approx (faiss index), or auto: the fastest measured "
        "setting reaching target_recall (10-recall@10), exact when none did",
    )
    nprobe: int | None = Field(None, ge=1, description="approx: IVF lists to scan")
    k_factor: float | None = Field(None, ge=1, le=1024, description="approx: re-rank k*k_factor")
    target_recall: float = Field(0.95, gt=0, le=1, description="auto: recall to reach")


class NearestParams(_Params):
    mode: Mode = Field("exact", description="as for search; auto measures 1-recall@1")
    nprobe: int | None = Field(None, ge=1)
    k_factor: float | None = Field(None, ge=1, le=1024)
    target_recall: float = Field(0.95, gt=0, le=1)
    channel_axis: int | None = Field(
        None, description="axis of the input holding the vector (1 for (B, C, H, W)); default last"
    )
    return_quantized: bool = Field(False, description="also return z_q in the input's layout")
    return_error: bool = Field(False, description="also return ||z - z_q||^2 per vector")
    codes_dtype: Literal["int16", "int32", "int64"] = "int64"


class DecodeParams(_Params):
    channel_axis: int | None = Field(None, description="where the vector axis goes; default last")


class CreateParams(_Params):
    metric: Literal["l2", "ip", "cosine"] = "l2"
    d: int | None = Field(None, ge=1, le=65536, description="width, for a bank made empty")
    shards: int = Field(
        1, ge=1, le=256, description="split the rows over this many shards (needs a Ray cluster)"
    )


class IndexParams(_Params):
    spec: str | None = Field(None, description="faiss index_factory string; default from nb, d")
    train_size: int | None = Field(None, ge=1, description="vectors sampled for training")


class TradeoffParams(_Params):
    specs: list[str] = Field([], description="other faiss specs to compare (built, then dropped)")
    n_queries: int = Field(1000, ge=10, le=100_000, description="perturbed queries to generate")
    batch_sizes: list[int] = Field([1, 64, 4096], min_length=1, max_length=8)
    min_seconds: float = Field(0.2, ge=0, le=10, description="timing per point and batch size")


def array_field(
    body: dict[str, Any], name: str, required: bool = True, d: int | None = None
) -> Any:
    """A numeric array from the body; 422 naming the field when it is missing or not numeric.
    With `d` (a field of vectors), JSON's `[]` (shape (0,)) is the empty batch (0, d)."""
    if name not in body or body[name] is None:
        if required:
            raise HTTPException(422, f"the body has no {name!r} field")
        return None
    a = as_tensor(body[name], name).numpy()
    return a.reshape(0, d) if d is not None and a.ndim == 1 and a.size == 0 else a


P = TypeVar("P", bound=BaseModel)


def from_query(model: type[P], request: Request) -> P:
    """`model` from the query string in one pydantic call (a bad value: 422 naming it). The
    hot routes call this rather than declare a FastAPI query model, which FastAPI extracts
    and checks field by field, as one more dependency (profiled: FastAPI's dependency solving
    was about a third of a one-vector request's CPU). `query_doc` documents the parameters.
    Errors carry FastAPI's location, ("query", name)."""
    try:
        # most calls carry no query string: skip starlette's parse of an empty one
        raw = request.scope["query_string"]
        return model.model_validate(dict(request.query_params) if raw else {})
    except ValidationError as exc:
        raise RequestValidationError(_located(exc, "query")) from exc


def query_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI query parameters of `model` (what FastAPI would write for a query model)."""
    schema = model.model_json_schema()
    params = []
    for name, prop in schema["properties"].items():
        doc = {k: v for k, v in prop.items() if k not in ("title", "description")}
        entry = {"name": name, "in": "query", "required": False, "schema": doc}
        if "description" in prop:
            entry["description"] = prop["description"]
        params.append(entry)
    return {"parameters": params}


def body_doc(fields: dict[str, str], main: str) -> dict[str, Any]:
    """OpenAPI for a body that is JSON or NumPy binary."""
    props = {k: {"description": v} for k, v in fields.items()}
    return {
        "requestBody": {
            "content": {
                "application/json": {"schema": {"type": "object", "properties": props}},
                "application/x-npy": {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": f"the {main!r} array as .npy (never pickled)",
                    }
                },
                "application/x-npz": {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": "several named arrays as .npz: " + ", ".join(fields),
                    }
                },
            }
        }
    }
