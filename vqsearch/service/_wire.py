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
import zipfile
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

NPY = "application/x-npy"
NPZ = "application/x-npz"
JSON = "application/json"
BINARY = (NPY, NPZ, "application/octet-stream")


def media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytearray:
    """The whole body, refusing (413) anything over `limit` before reading past it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # nobody is left to answer; a 4xx keeps it out of the error log and the 5xx count
        raise HTTPException(400, "client disconnected before sending the whole body") from None
    # a bytearray: arrays over it are writable, so the .npy path needs no copy of its own
    return bytearray().join(chunks)


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
    shape = tuple(int(v) for v in m.group(2).split(b",") if v.strip())
    dtype = np.dtype(m.group(1).decode())
    if len(body) - end < dtype.itemsize * math.prod(shape):
        return None  # short data: np.load says so
    count = math.prod(shape)
    a = np.frombuffer(body, dtype, count, end).reshape(shape)
    return a if a.flags.writeable and a.flags.aligned else a.copy()


def _load_npy(body: bytes | bytearray) -> np.ndarray:
    fast = _load_plain_npy(body)
    if fast is not None:
        return fast
    try:
        a = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise HTTPException(400, f"body is not a readable .npy array: {exc}") from exc
    if not isinstance(a, np.ndarray):
        raise HTTPException(400, "body is not a single .npy array")
    return a


def _load_npz(body: bytes | bytearray, limit: int) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            if sum(i.file_size for i in zf.infolist()) > limit:
                raise HTTPException(413, f"npz members inflate beyond the limit of {limit} bytes")
            with np.load(io.BytesIO(body), allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise HTTPException(400, f"body is not a readable .npz archive: {exc}") from exc


async def decode(request: Request, limit: int, main: str) -> dict[str, Any]:
    """Body -> fields. JSON gives its object; .npy gives {main: array}; .npz its arrays."""
    ctype = media_type(request.headers.get("content-type"))
    if ctype not in (JSON, NPY, NPZ, "application/octet-stream"):
        raise HTTPException(
            415, f"unsupported Content-Type {ctype or '(none)'!r}; use {JSON}, {NPY} or {NPZ}"
        )
    body = await read_body(request, limit)
    if ctype == JSON:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"body is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise HTTPException(422, f"JSON body must be an object with a {main!r} field")
        return doc
    if ctype == NPZ:
        return _load_npz(body, limit)
    return {main: _load_npy(body)}


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


def npy_bytes(a: np.ndarray) -> bytes:
    """`np.save`'s bytes for a plain numeric array, without its file machinery (~45 us of a
    one-vector request): format 1.0, the header padded to 64 bytes as numpy pads it."""
    if a.dtype.kind not in "biuf" or a.dtype.hasobject:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()
    a = a if a.flags.c_contiguous else a.copy(order="C")
    header = f"{{'descr': '{a.dtype.str}', 'fortran_order': False, 'shape': {a.shape}, }}"
    pad = 64 - (10 + len(header) + 1) % 64
    head = header + " " * (pad % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head.encode() + a.tobytes()


def respond(
    request: Request,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """One array -> .npy, several -> uncompressed .npz, or a JSON object of nested lists."""
    if wants_binary(request):
        buf = io.BytesIO()
        if len(arrays) == 1:
            return Response(npy_bytes(next(iter(arrays.values()))), media_type=NPY, headers=headers)
        else:
            np.savez(buf, allow_pickle=False, **arrays)
            kind = NPZ
        return Response(buf.getvalue(), media_type=kind, headers=headers)
    body = {k: _jsonable(v) for k, v in arrays.items()} | (meta or {})
    return JSONResponse(body, headers=headers)
