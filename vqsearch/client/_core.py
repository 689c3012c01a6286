"""What the sync and async clients share: requests as data, codecs, chunking, error mapping.

A client method builds a `Plan`: the HTTP calls to make (one per chunk of a large batch) and how
to combine their parsed answers. Only running a plan differs between the two clients.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from ._exceptions import JobFailedError, error_for

NPY, NPZ, JSON = "application/x-npy", "application/x-npz", "application/json"
VERSION_HEADER = "x-vqsearch-bank-version"


def to_numpy(x: Any) -> np.ndarray:
    """numpy array from array-likes and torch tensors (without importing torch)."""
    if type(x).__module__.split(".")[0] == "torch":
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return np.asarray(x.numpy())
    return np.asarray(x)


@dataclass
class Call:
    """One HTTP request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    params: dict[str, Any] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    idempotent: bool = True


@dataclass
class Plan:
    calls: list[Call]
    combine: Callable[[list[Any]], Any] = lambda results: results[0]
    pin_version: bool = False  # chunks after the first must see the bank version it saw

    def pin(self, later: list[Call], first: httpx.Response) -> None:
        """Make the later chunks fail with 412 if the bank changed since the first one."""
        version = first.headers.get(VERSION_HEADER)
        if self.pin_version and version:
            for call in later:
                call.headers["if-match"] = version


@dataclass
class SearchResult:
    """distances (nq, k) float32 and ids (nq, k) int64; unpacks as `D, I = result`."""

    distances: np.ndarray
    ids: np.ndarray
    version: str | None = None

    def __iter__(self) -> Any:
        return iter((self.distances, self.ids))


@dataclass
class NearestResult:
    """codes (...) of each vector; quantized (z_q, the input's layout) and errors when asked."""

    codes: np.ndarray
    quantized: np.ndarray | None = None
    errors: np.ndarray | None = None
    version: str | None = None


def index_done(info: dict[str, Any]) -> bool:
    """True once the bank's index is ready; JobFailedError if its build failed."""
    index = info.get("index") or {}
    if index.get("state") == "failed":
        raise JobFailedError(f"index build failed: {index.get('error')}")
    return bool(index.get("state") == "ready")


def sweep_done(job: dict[str, Any]) -> bool:
    """True once the bank's tradeoff sweep is done; JobFailedError if it failed."""
    if job.get("state") == "failed":
        raise JobFailedError(f"tradeoff sweep failed: {job.get('error')}")
    return bool(job.get("state") == "done")


def raise_for_status(resp: httpx.Response) -> None:
    """The one place server errors become client exceptions."""
    if resp.status_code < 400:
        return
    text = resp.text
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text[:200]
    raise error_for(resp.status_code, detail, text)


def _encode(
    arrays: dict[str, np.ndarray], binary: bool, extra: dict[str, Any]
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


def decode_arrays(resp: httpx.Response) -> dict[str, np.ndarray]:
    ctype = resp.headers.get("content-type", "").split(";")[0]
    if ctype == NPY:
        return {"": np.load(io.BytesIO(resp.content), allow_pickle=False)}
    if ctype == NPZ:
        with np.load(io.BytesIO(resp.content), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    doc = resp.json()
    out = {}
    for k, v in doc.items():
        if isinstance(v, (list, int, float)) and not isinstance(v, bool):
            a = np.asarray(v, dtype=object)
            out[k] = np.where(a == None, np.inf, a) if (a == None).any() else np.asarray(v)  # noqa: E711
    return out


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (str(v).lower() if isinstance(v, bool) else v)
        for k, v in params.items()
        if v is not None
    }


class Methods:
    """The API, one method per route; subclasses define `_run(plan)` (sync or async)."""

    def __init__(self, binary: bool = True, chunk_size: int = 65536) -> None:
        self.binary, self.chunk_size = binary, chunk_size

    def _run(self, plan: Plan) -> Any:
        raise NotImplementedError

    def _get(self, path: str) -> Any:
        return self._run(Plan([Call("GET", path, lambda r: r.json())]))

    def _array_call(
        self,
        path: str,
        arrays: dict[str, np.ndarray],
        params: dict[str, Any],
        parse: Callable[[httpx.Response], Any],
        idempotent: bool = True,
        version: str | None = None,
        method: str = "POST",
    ) -> Call:
        content, ctype, query = _encode(arrays, self.binary, _clean(params))
        headers = {"content-type": ctype, "accept": NPZ if self.binary else JSON}
        if version is not None:
            headers["if-match"] = version
        return Call(method, path, parse, query, content, headers, idempotent)

    def _chunked(
        self,
        path: str,
        name: str,
        x: np.ndarray,
        params: dict[str, Any],
        parse: Callable[[httpx.Response], Any],
        combine: Callable[[list[Any]], Any],
        version: str | None,
        axis: int | None = None,
    ) -> Plan:
        """One call per `chunk_size` rows of x's first axis; none when that axis is the vector
        axis (`axis` 0), which cannot be split."""
        n = len(x) if x.ndim else 1
        whole = x.ndim == 0 or (axis is not None and axis % x.ndim == 0)
        starts = [0] if whole else range(0, max(n, 1), self.chunk_size)
        calls = [
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

    def health(self) -> Any:
        """{"status": "ok"} while the server process is alive."""
        return self._get("/healthz")

    def ready(self) -> Any:
        return self._get("/readyz")

    def list_banks(self) -> Any:
        """A list of bank infos (dicts)."""
        return self._get("/v1/banks")

    def get_bank(self, name: str) -> Any:
        """Bank info: d, count, metric, bytes, version, index state."""
        return self._get(f"/v1/banks/{name}")

    def create_bank(
        self,
        name: str,
        vectors: Any = None,
        ids: Any = None,
        metric: str = "l2",
        d: int | None = None,
    ) -> Any:
        """Create a bank from vectors (n, d), or empty with `d`. Returns its info."""
        arrays = {} if vectors is None else {"vectors": to_numpy(vectors)}
        if ids is not None:
            arrays["ids"] = to_numpy(ids).astype(np.int64)
        params = {"metric": metric, "d": d}
        if not arrays:
            content = json.dumps(_clean(params)).encode()
            call = Call(
                "PUT",
                f"/v1/banks/{name}",
                lambda r: r.json(),
                {},
                content,
                {"content-type": JSON},
                False,
            )
        else:
            call = self._array_call(
                f"/v1/banks/{name}", arrays, params, lambda r: r.json(), False, method="PUT"
            )
        return self._run(Plan([call]))

    def delete_bank(self, name: str) -> Any:
        return self._run(Plan([Call("DELETE", f"/v1/banks/{name}", lambda r: r.json())]))

    def add(self, name: str, vectors: Any, ids: Any = None) -> Any:
        """Append vectors (n, d); returns the ids (n,) they were given. Never retried."""
        arrays = {"vectors": to_numpy(vectors)}
        if ids is not None:
            arrays["ids"] = to_numpy(ids).astype(np.int64)

        def parse(r: httpx.Response) -> np.ndarray:
            a = decode_arrays(r)
            return np.asarray(a.get("ids", a.get("")), dtype=np.int64)

        return self._run(
            Plan(
                [self._array_call(f"/v1/banks/{name}/vectors", arrays, {}, parse, idempotent=False)]
            )
        )

    def remove(self, name: str, ids: Any) -> Any:
        """Delete vectors by id (all or none); returns how many were removed."""
        call = self._array_call(
            f"/v1/banks/{name}/vectors",
            {"ids": to_numpy(ids).astype(np.int64)},
            {},
            lambda r: r.json()["removed"],
            method="DELETE",
        )
        return self._run(Plan([call]))

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
    ) -> Any:
        """Top-k: `SearchResult` (distances, ids), each (nq, k). Large batches go in chunks.
        mode: exact, approx, or auto (fastest measured setting reaching `target_recall`)."""

        def parse(r: httpx.Response) -> SearchResult:
            a = decode_arrays(r)
            return SearchResult(
                a["distances"].astype(np.float32),
                a["ids"].astype(np.int64),
                r.headers.get(VERSION_HEADER),
            )

        def combine(parts: list[SearchResult]) -> SearchResult:
            return SearchResult(
                np.concatenate([p.distances for p in parts]),
                np.concatenate([p.ids for p in parts]),
                parts[0].version,
            )

        params = {
            "k": k,
            "mode": mode,
            "nprobe": nprobe,
            "k_factor": k_factor,
            "target_recall": target_recall,
        }
        return self._run(
            self._chunked(
                f"/v1/banks/{name}/search",
                "queries",
                to_numpy(queries),
                params,
                parse,
                combine,
                version,
            )
        )

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
    ) -> Any:
        """Nearest code of every vector: `NearestResult`. z (..., d) -> codes (...); with
        channel_axis=1, z (B, C, H, W) -> codes (B, H, W). Chunks split the first axis."""
        zn = to_numpy(z)

        def parse(r: httpx.Response) -> NearestResult:
            a = decode_arrays(r)
            codes = a["codes"] if "codes" in a else a[""]
            return NearestResult(
                codes, a.get("quantized"), a.get("errors"), r.headers.get(VERSION_HEADER)
            )

        def combine(parts: list[NearestResult]) -> NearestResult:
            def cat(field_: str) -> np.ndarray | None:
                got = [getattr(p, field_) for p in parts]
                return None if got[0] is None else np.concatenate(got)

            return NearestResult(cat("codes"), cat("quantized"), cat("errors"), parts[0].version)  # type: ignore[arg-type]

        params = {
            "channel_axis": channel_axis,
            "return_quantized": return_quantized,
            "return_error": return_error,
            "codes_dtype": codes_dtype,
            "mode": mode,
            "nprobe": nprobe,
            "target_recall": target_recall,
        }
        return self._run(
            self._chunked(
                f"/v1/banks/{name}/nearest",
                "queries",
                zn,
                params,
                parse,
                combine,
                version,
                channel_axis,
            )
        )

    def decode(
        self, name: str, codes: Any, channel_axis: int | None = None, version: str | None = None
    ) -> Any:
        """Codes of any shape -> vectors codes.shape + (d,) (or d at `channel_axis`)."""

        def parse(r: httpx.Response) -> np.ndarray:
            a = decode_arrays(r)
            return np.asarray(a.get("vectors", a.get("")), dtype=np.float32)

        c = to_numpy(codes).astype(np.int64)
        # the answer has one more axis than the codes; d first means no axis to split
        first = channel_axis is not None and channel_axis % (c.ndim + 1) == 0
        params = {"channel_axis": channel_axis}
        path = f"/v1/banks/{name}/decode"
        plan = self._chunked(
            path, "codes", c, params, parse, np.concatenate, version, 0 if first else None
        )
        return self._run(plan)

    def build_index(self, name: str, spec: str | None = None, train_size: int | None = None) -> Any:
        """Start building the bank's approximate index (202); returns the index state."""
        content = json.dumps(_clean({"spec": spec, "train_size": train_size})).encode()
        return self._run(
            Plan(
                [
                    Call(
                        "PUT",
                        f"/v1/banks/{name}/index",
                        lambda r: r.json(),
                        {},
                        content,
                        {"content-type": JSON},
                    )
                ]
            )
        )

    def tradeoff(
        self,
        name: str,
        queries: Any = None,
        specs: Sequence[str] = (),
        n_queries: int | None = None,
        batch_sizes: Sequence[int] | None = None,
        min_seconds: float | None = None,
    ) -> Any:
        """Start a recall/speed sweep of the bank (202); returns the job state."""
        params = _clean(
            {
                "specs": list(specs),
                "n_queries": n_queries,
                "min_seconds": min_seconds,
                "batch_sizes": None if batch_sizes is None else list(batch_sizes),
            }
        )
        doc = params | ({} if queries is None else {"queries": to_numpy(queries).tolist()})
        call = Call(
            "POST",
            f"/v1/banks/{name}/tradeoff",
            lambda r: r.json(),
            {},
            json.dumps(doc).encode(),
            {"content-type": JSON},
            idempotent=False,
        )
        return self._run(Plan([call]))

    def get_tradeoff(self, name: str) -> Any:
        """{"state", "progress", "report"}: the last measured curve of the bank."""
        return self._get(f"/v1/banks/{name}/tradeoff")
