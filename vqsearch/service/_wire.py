"""Wire formats: JSON (nested lists) and NumPy binary (`.npy` one array, `.npz` several).

Requests pick the format by `Content-Type`; answers by `Accept`, defaulting to the request's own
format. Bodies are never unpickled (`allow_pickle=False`), and `.npz` members are size-checked
before they are inflated.
"""

from __future__ import annotations

import io
import json
import math
import re
import tokenize
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vqsearch._wire_names import BINARY, JSON, MEDIA_TYPES, NPY, NPZ

from ._admission import BODY, read_whole
from ._budget import JSON_HOLD, JSON_NUMBER_BYTES, JSON_OBJECT_BYTES, take


def media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytearray:
    """The whole body: as the admission middleware read it before it admitted the request (the
    API under /v1/), else read here by the same reader (routes included elsewhere)."""
    body = request.scope.get(BODY)
    if body is not None:
        await request.receive()  # the replayed end of body: later reads see the real channel
        return body
    timeout = request.app.state.settings.body_timeout
    body = await read_whole(request.scope, request.receive, limit, timeout)
    if body is None:  # nobody is left to answer; a 4xx keeps it out of the 5xx count
        raise HTTPException(400, "client disconnected before sending the whole body")
    return body


# The header numpy writes: a v1.0 dict of one plain dtype, C order, an int shape. numpy parses
# every header with ast.literal_eval (150 us, half a one-vector request); this one is a regex.
_PLAIN_HEADER = re.compile(
    rb"\{'descr': '([<>|][fiub][1248])', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \} *\n"
)


def _load_plain_npy(body: bytes | bytearray) -> np.ndarray | None:
    """A .npy in numpy's own plain layout, or None (anything else goes through np.load)."""
    if body[:8] != b"\x93NUMPY\x01\x00" or len(body) < 10:
        return None
    end = 10 + int.from_bytes(body[8:10], "little")
    m = _PLAIN_HEADER.fullmatch(body[10:end])
    if m is None:
        return None
    try:
        shape = tuple(int(v) for v in m.group(2).split(b",") if v.strip())
    except ValueError:
        return None  # "(2 256)": the full parser says what is wrong
    dtype = np.dtype(m.group(1).decode())
    if len(body) - end != dtype.itemsize * math.prod(shape):
        return None  # data of another size: `_load_npy` says so
    count = math.prod(shape)
    a = np.frombuffer(body, dtype, count, end).reshape(shape)
    return a if a.flags.writeable and a.flags.aligned else a.copy()


MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 1 << 16  # a numeric array's header is ~100 bytes
MAX_NPZ_MEMBERS = 16  # a request names a handful of fields


def _not_npy(body: bytes | bytearray) -> HTTPException:
    head = bytes(body[:1])
    hint = " (it looks like JSON: send it as application/json)" if head in (b"{", b"[") else ""
    return HTTPException(400, f"body is not a .npy array: it does not start with {MAGIC!r}{hint}")


def _load_npy(body: bytes | bytearray) -> np.ndarray:
    """A .npy array over the body's bytes. Refused with a 400 naming the problem: no magic, a
    header that does not parse or is too large, object (pickled) data, or data of another size
    than the header's shape says (so a header cannot make the server allocate what it was not
    sent)."""
    if body[:6] != MAGIC:
        raise _not_npy(body)
    fast = _load_plain_npy(body)
    if fast is not None:
        return fast
    f = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(f)
        size = body[8:10] if version == (1, 0) else body[8:12]
        if int.from_bytes(size, "little") > MAX_HEADER_BYTES:
            raise ValueError(f"the header is over {MAX_HEADER_BYTES} bytes")
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_HEADER_BYTES)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(f, max_header_size=MAX_HEADER_BYTES)
        else:
            raise ValueError(f".npy format version {version} (1.0 and 2.0 are read)")
        shape, fortran, dtype = header
    except (ValueError, SyntaxError, EOFError, TypeError, tokenize.TokenError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, tokenize.TokenError):
            why = "its header is not a complete dict"
        raise HTTPException(400, f"body is not a readable .npy array: {why}") from exc
    if dtype.hasobject:
        raise HTTPException(400, "the .npy array holds pickled objects (never loaded)")
    offset, count = f.tell(), math.prod(shape)
    if len(body) - offset != count * dtype.itemsize:
        raise HTTPException(
            400,
            f"the .npy header says {dtype.str}{shape} ({count * dtype.itemsize} bytes of data); "
            f"the body holds {len(body) - offset}",
        )
    a = np.frombuffer(body, dtype, count, offset)
    return a.reshape(shape, order="F" if fortran else "C")


def _field(a: np.ndarray) -> Any:
    """An .npz member: a 0-d array is a scalar field (`k`, `mode`), else an array."""
    return a.item() if a.ndim == 0 else a


def _npz(body: bytes | bytearray, limit: int) -> tuple[zipfile.ZipFile, int]:
    """The archive and what its members inflate to (as their headers declare; zipfile reads no
    more than that of each), refused when it has too many members or inflates past `limit`."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise HTTPException(400, f"body is not a readable .npz archive: {exc}") from exc
    try:
        infos = zf.infolist()
        if len(infos) > MAX_NPZ_MEMBERS:
            raise HTTPException(
                400, f"the .npz has {len(infos)} members; at most {MAX_NPZ_MEMBERS}"
            )
        inflated = sum(i.file_size for i in infos)
        if inflated > limit:
            raise HTTPException(413, f"npz members inflate beyond the limit of {limit} bytes")
    except HTTPException:
        zf.close()
        raise
    return zf, inflated


def _load_npz(zf: zipfile.ZipFile) -> dict[str, Any]:
    """Each member read by zipfile (CRC-checked), then parsed like a .npy body: writable
    arrays over their own bytes."""
    try:
        return {
            i.filename.removesuffix(".npy"): _field(_load_npy(bytearray(zf.read(i))))
            for i in zf.infolist()
        }
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise HTTPException(400, f"body is not a readable .npz archive: {exc}") from exc


def _no_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return length == "0" or (length is None and "transfer-encoding" not in request.headers)


def _parse_json(body: bytes | bytearray) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise HTTPException(400, "body is not usable JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"body is not valid JSON: {exc}") from exc


async def decode(request: Request, limit: int, main: str) -> dict[str, Any]:
    """Body -> fields. JSON gives its object; .npy gives {main: array}; .npz its arrays (0-d
    members as scalars); no body at all gives {} (the route says what it lacks)."""
    ctype = media_type(request.headers.get("content-type"))
    if not ctype and _no_body(request):
        return {}
    if ctype not in MEDIA_TYPES:
        raise HTTPException(
            415, f"unsupported Content-Type {ctype or '(none)'!r}; use {JSON}, {NPY} or {NPZ}"
        )
    body = await read_body(request, limit)
    if ctype == JSON:
        take(request, JSON_OBJECT_BYTES * len(body), "parsing the JSON body")
        doc = await _off_loop(len(body), _parse_json, body)
        if not isinstance(doc, dict):
            raise HTTPException(422, f"JSON body must be an object with a {main!r} field")
        return doc
    if ctype == NPZ:
        zf, inflated = _npz(body, limit)
        with zf:
            take(request, inflated, "the .npz members")
            fields: dict[str, Any] = await _off_loop(inflated, _load_npz, zf)
        return fields
    return {main: _load_npy(body)}


OFF_LOOP_BYTES = 1 << 20  # parsing or encoding more than this runs on a worker thread


async def _off_loop(size: int, fn: Any, *args: Any) -> Any:
    """fn(*args), on a worker thread when `size` says it takes long: a large body is never
    parsed (nor an answer encoded) on the event loop, where every other request waits."""
    if size < OFF_LOOP_BYTES:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


def wants_binary(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    kinds = {media_type(a) for a in accept.split(",")} if accept else set()
    if kinds & set(BINARY):
        return True
    if JSON in kinds:
        return False
    return media_type(request.headers.get("content-type")) in BINARY


def _jsonable(a: np.ndarray) -> Any:
    # JSON has no inf/nan: faiss marks missing results with them; send null instead.
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        out = a.astype(object)
        out[~np.isfinite(a)] = None
        return out.tolist()
    return a.tolist()


def _npy_header(a: np.ndarray) -> bytes:
    """`np.save`'s header for a plain numeric C-order array: format 1.0, padded to 64 bytes as
    numpy pads it."""
    header = f"{{'descr': '{a.dtype.str}', 'fortran_order': False, 'shape': {a.shape}, }}"
    pad = 64 - (10 + len(header) + 1) % 64
    head = header + " " * (pad % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head.encode()


def npy_bytes(a: np.ndarray) -> bytes:
    """`np.save`'s bytes for a plain numeric array, without its file machinery (~45 us of a
    one-vector request)."""
    if a.dtype.kind not in "biuf" or a.dtype.hasobject:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()
    a = a if a.flags.c_contiguous else a.copy(order="C")
    return _npy_header(a) + a.tobytes()


STREAM_BYTES = 8 << 20  # a larger .npy answer is sent from the array, not copied into bytes


def _npy_chunks(a: np.ndarray) -> Iterator[bytes]:
    """A numeric array as .npy, 1 MiB at a time, read from the array itself."""
    a = a if a.flags.c_contiguous else np.ascontiguousarray(a)
    yield _npy_header(a)
    flat = a.reshape(-1).view(np.uint8)
    for i in range(0, len(flat), 1 << 20):
        yield flat[i : i + (1 << 20)].tobytes()


def _json_response(
    arrays: dict[str, np.ndarray], meta: dict[str, Any] | None, headers: dict[str, str] | None
) -> JSONResponse:
    body = {k: _jsonable(v) for k, v in arrays.items()} | (meta or {})
    return JSONResponse(body, headers=headers)


def check_answer(
    request: Request, limit: int, arrays: dict[str, tuple[int, int]], fix: str
) -> None:
    """Refuse (422), before any work, an answer over VQSEARCH_MAX_ANSWER_BYTES, and take what it
    will hold from the memory budget. arrays: name -> (values, bytes of a value in binary);
    JSON is counted at its encoded size. `fix`: what to ask for instead."""
    binary = wants_binary(request)
    size = sum(n * (item if binary else JSON_NUMBER_BYTES) for n, item in arrays.values())
    if size > limit:
        alt = "" if binary else ", or a binary answer (Accept: application/x-npy)"
        raise HTTPException(
            422,
            f"the answer would take about {size} bytes as {'binary' if binary else 'JSON'}, "
            f"over VQSEARCH_MAX_ANSWER_BYTES={limit}: ask for {fix}{alt}",
        )
    # .npy streams from the array; an .npz is written into a buffer beside it; JSON is held
    # as arrays, Python objects and text
    hold = JSON_HOLD if not binary else 1 if len(arrays) == 1 else 2
    take(request, size * hold, "the answer")


async def respond(
    request: Request,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """One array -> .npy, several -> uncompressed .npz, or a JSON object of nested lists.
    A large .npy is streamed from the array; large encodings run off the event loop."""
    size = sum(a.nbytes for a in arrays.values())
    if wants_binary(request):
        if len(arrays) == 1:
            a = next(iter(arrays.values()))
            if a.nbytes > STREAM_BYTES and a.dtype.kind in "biuf":
                return StreamingResponse(_npy_chunks(a), media_type=NPY, headers=headers)
            return Response(npy_bytes(a), media_type=NPY, headers=headers)
        buf = io.BytesIO()
        await _off_loop(size, lambda: np.savez(buf, allow_pickle=False, **arrays))
        return Response(buf.getvalue(), media_type=NPZ, headers=headers)
    response: Response = await _off_loop(size * 4, _json_response, arrays, meta, headers)
    return response
