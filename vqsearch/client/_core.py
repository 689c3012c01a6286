"""What the sync and async clients share: requests as data, codecs, chunking, error mapping.

Each route is a method of `Requests` that builds a `Plan[T]`: the HTTP calls to make (one per
chunk of a large batch) and how to combine their parsed answers into the method's result `T`.
Only running a plan differs between the two clients.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
import numpy as np
import numpy.typing as npt

from .._wire_names import (
    ACCEPT_HEADER,
    API_PREFIX,
    CODES_FIELD,
    CONTENT_TYPE_HEADER,
    DECODE_ROUTE,
    DISTANCES_FIELD,
    ERRORS_FIELD,
    HEALTH_PATH,
    IDS_FIELD,
    IF_MATCH_HEADER,
    INDEX_ROUTE,
    JSON,
    NEAREST_ROUTE,
    NPY,
    NPZ,
    QUANTIZED_FIELD,
    QUERIES_FIELD,
    READY_PATH,
    REQUEST_ID_HEADER,
    SEARCH_ROUTE,
    SETTING_HEADER,
    TRADEOFF_ROUTE,
    VECTORS_FIELD,
    VECTORS_ROUTE,
    VERSION_HEADER,
    IndexPhase,
    SweepPhase,
    bank_path,
)
from ._exceptions import JobFailedError, ResponseFormatError, VQSearchClientError, error_for
from ._types import (
    BankInfo,
    Health,
    IndexInfo,
    NearestResult,
    SearchResult,
    TradeoffJob,
)

T = TypeVar("T")
U = TypeVar("U")
ADD_CHUNK_BYTES = 64 << 20  # vectors in one append: a quarter of the server's default body limit
Array = npt.NDArray[Any]


def to_numpy(x: Any) -> Array:
    """numpy array from array-likes and torch tensors (without importing torch)."""
    if type(x).__module__.split(".")[0] == "torch":
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return np.asarray(x.numpy())
    return np.asarray(x)


def _json_object(r: httpx.Response) -> dict[str, Any]:
    doc = r.json()
    if not isinstance(doc, dict):
        raise TypeError(f"{r.request.method} {r.request.url.path}: expected a JSON object")
    return doc


@dataclass
class Call(Generic[U]):
    """One HTTP request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], U]
    params: dict[str, Any] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    idempotent: bool = True

    def read(self, resp: httpx.Response) -> U:
        """The parsed answer; a success this client cannot read is a `ResponseFormatError`."""
        try:
            return self.parse(resp)
        except (KeyError, TypeError, ValueError) as exc:
            raise ResponseFormatError(
                f"{self.method} {self.path}: unreadable answer: {exc!r}"
            ) from exc


def _first(results: list[Any]) -> Any:
    return results[0]


@dataclass
class Plan(Generic[T]):
    calls: list[Call[Any]]
    combine: Callable[[list[Any]], T] = _first
    pin_version: bool = False  # chunks after the first must see the bank version it saw
    sequential: bool = False  # calls one after another, in order (appends)

    def failed_after(self, exc: VQSearchClientError, done: list[Any]) -> None:
        """A sequential plan's call failed after `done` succeeded: say what did land."""
        if done:
            exc.added = self.combine(done)

    def pin(self, later: list[Call[Any]], first: httpx.Response) -> None:
        """Make the later chunks fail with 412 if the bank changed since the first one."""
        version = first.headers.get(VERSION_HEADER)
        if self.pin_version and version:
            for call in later:
                call.headers[IF_MATCH_HEADER] = version


def _concat_ids(parts: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def one(call: Call[T]) -> Plan[T]:
    """A plan of one call, whose result is that call's."""
    return Plan([call], _first)


def index_done(info: BankInfo) -> bool:
    """True once the bank's index is ready; JobFailedError if its build failed."""
    if info.index is not None and info.index.state is IndexPhase.FAILED:
        raise JobFailedError(f"index build failed: {info.index.error}")
    return info.index is not None and info.index.state is IndexPhase.READY


def sweep_done(job: TradeoffJob) -> bool:
    """True once the bank's tradeoff sweep is done; JobFailedError if it failed."""
    if job.state is SweepPhase.FAILED:
        raise JobFailedError(f"tradeoff sweep failed: {job.error}")
    return job.state is SweepPhase.DONE


def raise_for_status(resp: httpx.Response) -> None:
    """The one place server errors become client exceptions."""
    if resp.status_code < 400:
        return
    text = resp.text
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text[:200]
    raise error_for(resp.status_code, detail, text, resp.headers.get(REQUEST_ID_HEADER))


def _encode(
    arrays: dict[str, Array], binary: bool, extra: dict[str, Any]
) -> tuple[bytes, str, dict[str, Any]]:
    """Body bytes, content type, and the parameters that go in the query string."""
    if not binary:
        doc = {k: v.tolist() for k, v in arrays.items()} | extra
        return json.dumps(doc).encode(), JSON, {}
    buf = io.BytesIO()
    if len(arrays) == 1:
        np.save(buf, next(iter(arrays.values())), allow_pickle=False)
        return buf.getvalue(), NPY, extra
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue(), NPZ, extra


def decode_arrays(resp: httpx.Response) -> dict[str, Array]:
    """The answer's arrays by name; a lone `.npy` array is named ""."""
    ctype = resp.headers.get("content-type", "").split(";")[0]
    if ctype == NPY:
        return {"": np.load(io.BytesIO(resp.content), allow_pickle=False)}
    if ctype == NPZ:
        with np.load(io.BytesIO(resp.content), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    doc = _json_object(resp)
    out = {}
    for k, v in doc.items():
        if isinstance(v, (list, int, float)) and not isinstance(v, bool):
            a = np.asarray(v, dtype=object)
            out[k] = np.where(a == None, np.inf, a) if (a == None).any() else np.asarray(v)  # noqa: E711
    return out


def _array(arrays: dict[str, Array], name: str) -> Array:
    """The named array of an answer, or its lone `.npy` array."""
    return arrays[name] if name in arrays else arrays[""]


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (str(v).lower() if isinstance(v, bool) else v)
        for k, v in params.items()
        if v is not None
    }


def _json_call(
    method: str, path: str, parse: Callable[[httpx.Response], T], doc: Any, idempotent: bool = True
) -> Call[T]:
    return Call(
        method,
        path,
        parse,
        {},
        json.dumps(doc).encode(),
        {CONTENT_TYPE_HEADER: JSON},
        idempotent,
    )


class Requests:
    """The API, one method per route, each returning the `Plan` a client runs."""

    def __init__(self, binary: bool = True, chunk_size: int = 65536) -> None:
        self.binary, self.chunk_size = binary, chunk_size

    def _get(self, path: str, parse: Callable[[dict[str, Any]], T]) -> Plan[T]:
        return one(Call("GET", path, lambda r: parse(_json_object(r))))

    def _array_call(
        self,
        path: str,
        arrays: dict[str, Array],
        params: dict[str, Any],
        parse: Callable[[httpx.Response], T],
        idempotent: bool = True,
        version: str | None = None,
        method: str = "POST",
    ) -> Call[T]:
        content, ctype, query = _encode(arrays, self.binary, _clean(params))
        headers = {CONTENT_TYPE_HEADER: ctype, ACCEPT_HEADER: NPZ if self.binary else JSON}
        if version is not None:
            headers[IF_MATCH_HEADER] = version
        return Call(method, path, parse, query, content, headers, idempotent)

    def _chunked(
        self,
        path: str,
        name: str,
        x: Array,
        params: dict[str, Any],
        parse: Callable[[httpx.Response], U],
        combine: Callable[[list[U]], T],
        version: str | None,
        axis: int | None = None,
    ) -> Plan[T]:
        """One call per `chunk_size` rows of x's first axis; none when that axis is the vector
        axis (`axis` 0), which cannot be split."""
        n = len(x) if x.ndim else 1
        whole = x.ndim == 0 or (axis is not None and axis % x.ndim == 0)
        starts = [0] if whole else range(0, max(n, 1), self.chunk_size)
        calls: list[Call[Any]] = [
            self._array_call(
                path,
                {name: x if whole else x[i0 : i0 + self.chunk_size]},
                params,
                parse,
                version=version,
            )
            for i0 in starts
        ]
        return Plan(calls, combine, pin_version=version is None and len(calls) > 1)

    # -- routes ----------------------------------------------------------------------------------

    def health(self) -> Plan[Health]:
        return self._get(HEALTH_PATH, Health.from_json)

    def ready(self) -> Plan[Health]:
        return self._get(READY_PATH, Health.from_json)

    def list_banks(self) -> Plan[list[BankInfo]]:
        return one(Call("GET", API_PREFIX, lambda r: [BankInfo.from_json(b) for b in r.json()]))

    def get_bank(self, name: str) -> Plan[BankInfo]:
        return self._get(bank_path(name), BankInfo.from_json)

    def create_bank(
        self,
        name: str,
        vectors: Any = None,
        ids: Any = None,
        metric: str = "l2",
        d: int | None = None,
        shards: int = 1,
    ) -> Plan[BankInfo]:
        arrays = {} if vectors is None else {VECTORS_FIELD: to_numpy(vectors)}
        if ids is not None:
            arrays[IDS_FIELD] = to_numpy(ids).astype(np.int64)
        params = {"metric": metric, "d": d, "shards": None if shards == 1 else shards}

        def parse(r: httpx.Response) -> BankInfo:
            return BankInfo.from_json(_json_object(r))

        if not arrays:
            return one(_json_call("PUT", bank_path(name), parse, _clean(params), False))
        return one(self._array_call(bank_path(name), arrays, params, parse, False, method="PUT"))

    def delete_bank(self, name: str) -> Plan[str]:
        return one(Call("DELETE", bank_path(name), lambda r: str(_json_object(r)["deleted"])))

    def add(self, name: str, vectors: Any, ids: Any = None) -> Plan[npt.NDArray[np.int64]]:
        """Appends of at most ADD_CHUNK_BYTES of vectors each, sent in order."""
        x = to_numpy(vectors)
        id_a = None if ids is None else to_numpy(ids).astype(np.int64)
        # anything but a matrix with one id per row goes whole: the server names what is wrong
        whole = x.ndim != 2 or (id_a is not None and id_a.shape != (len(x),))
        step = len(x) if whole else max(1, ADD_CHUNK_BYTES // max(1, x[:1].nbytes))
        starts = [0] if whole or len(x) == 0 else range(0, len(x), step)

        def parse(r: httpx.Response) -> npt.NDArray[np.int64]:
            return np.asarray(_array(decode_arrays(r), IDS_FIELD), dtype=np.int64)

        path = bank_path(name, VECTORS_ROUTE)
        calls: list[Call[Any]] = []
        for i0 in starts:
            arrays = {VECTORS_FIELD: x if whole else x[i0 : i0 + step]}
            if id_a is not None:
                arrays[IDS_FIELD] = id_a if whole else id_a[i0 : i0 + step]
            calls.append(self._array_call(path, arrays, {}, parse, idempotent=False))
        return Plan(calls, _concat_ids, sequential=True)

    def remove(self, name: str, ids: Any) -> Plan[int]:
        return one(
            self._array_call(
                bank_path(name, VECTORS_ROUTE),
                {IDS_FIELD: to_numpy(ids).astype(np.int64)},
                {},
                lambda r: int(_json_object(r)["removed"]),
                method="DELETE",
            )
        )

    def search(
        self,
        name: str,
        queries: Any,
        k: int = 10,
        mode: str = "exact",
        nprobe: int | None = None,
        k_factor: float | None = None,
        version: str | None = None,
        target_recall: float | None = None,
    ) -> Plan[SearchResult]:
        def parse(r: httpx.Response) -> SearchResult:
            a = decode_arrays(r)
            return SearchResult(
                a[DISTANCES_FIELD].astype(np.float32),
                a[IDS_FIELD].astype(np.int64),
                r.headers.get(VERSION_HEADER),
                r.headers.get(SETTING_HEADER),
            )

        def combine(parts: list[SearchResult]) -> SearchResult:
            return SearchResult(
                np.concatenate([p.distances for p in parts]),
                np.concatenate([p.ids for p in parts]),
                parts[0].version,
                parts[0].setting,
            )

        params = {
            "k": k,
            "mode": mode,
            "nprobe": nprobe,
            "k_factor": k_factor,
            "target_recall": target_recall,
        }
        path = bank_path(name, SEARCH_ROUTE)
        xq = to_numpy(queries)
        return self._chunked(path, QUERIES_FIELD, xq, params, parse, combine, version)

    def nearest(
        self,
        name: str,
        z: Any,
        channel_axis: int | None = None,
        return_quantized: bool = False,
        return_error: bool = False,
        codes_dtype: str = "int64",
        mode: str = "exact",
        nprobe: int | None = None,
        version: str | None = None,
        target_recall: float | None = None,
    ) -> Plan[NearestResult]:
        def parse(r: httpx.Response) -> NearestResult:
            a = decode_arrays(r)
            return NearestResult(
                _array(a, CODES_FIELD),
                a.get(QUANTIZED_FIELD),
                a.get(ERRORS_FIELD),
                r.headers.get(VERSION_HEADER),
                r.headers.get(SETTING_HEADER),
            )

        def combine(parts: list[NearestResult]) -> NearestResult:
            def cat(got: list[Array | None]) -> Array | None:
                arrays = [a for a in got if a is not None]
                return np.concatenate(arrays) if len(arrays) == len(got) else None

            return NearestResult(
                np.concatenate([p.codes for p in parts]),
                cat([p.quantized for p in parts]),
                cat([p.errors for p in parts]),
                parts[0].version,
                parts[0].setting,
            )

        params = {
            "channel_axis": channel_axis,
            "return_quantized": return_quantized,
            "return_error": return_error,
            "codes_dtype": codes_dtype,
            "mode": mode,
            "nprobe": nprobe,
            "target_recall": target_recall,
        }
        path = bank_path(name, NEAREST_ROUTE)
        zn = to_numpy(z)
        return self._chunked(path, QUERIES_FIELD, zn, params, parse, combine, version, channel_axis)

    def decode(
        self, name: str, codes: Any, channel_axis: int | None = None, version: str | None = None
    ) -> Plan[npt.NDArray[np.float32]]:
        def parse(r: httpx.Response) -> npt.NDArray[np.float32]:
            return np.asarray(_array(decode_arrays(r), VECTORS_FIELD), dtype=np.float32)

        def combine(parts: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
            return np.concatenate(parts)

        c = to_numpy(codes).astype(np.int64)
        # the answer has one more axis than the codes; d first means no axis to split
        first = channel_axis is not None and channel_axis % (c.ndim + 1) == 0
        params = {"channel_axis": channel_axis}
        path = bank_path(name, DECODE_ROUTE)
        axis = 0 if first else None
        return self._chunked(path, CODES_FIELD, c, params, parse, combine, version, axis)

    def build_index(
        self, name: str, spec: str | None = None, train_size: int | None = None
    ) -> Plan[IndexInfo]:
        doc = _clean({"spec": spec, "train_size": train_size})
        path = bank_path(name, INDEX_ROUTE)
        return one(_json_call("PUT", path, lambda r: IndexInfo.from_json(_json_object(r)), doc))

    def tradeoff(
        self,
        name: str,
        queries: Any = None,
        specs: Sequence[str] = (),
        n_queries: int | None = None,
        batch_sizes: Sequence[int] | None = None,
        min_seconds: float | None = None,
    ) -> Plan[TradeoffJob]:
        params = _clean(
            {
                "specs": list(specs),
                "n_queries": n_queries,
                "min_seconds": min_seconds,
                "batch_sizes": None if batch_sizes is None else list(batch_sizes),
            }
        )
        doc = params | ({} if queries is None else {QUERIES_FIELD: to_numpy(queries).tolist()})
        path = bank_path(name, TRADEOFF_ROUTE)

        def parse(r: httpx.Response) -> TradeoffJob:
            return TradeoffJob.from_json(_json_object(r))

        return one(_json_call("POST", path, parse, doc, idempotent=False))

    def get_tradeoff(self, name: str) -> Plan[TradeoffJob]:
        return self._get(bank_path(name, TRADEOFF_ROUTE), TradeoffJob.from_json)
