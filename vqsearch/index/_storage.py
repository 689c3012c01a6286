"""Files of a bank directory: atomic writes, checksummed arrays, a self-checking manifest.

Every file is written to a temporary name, fsynced, renamed into place, and the directory fsynced,
so a crash leaves either the old file or the new one. The manifest is the single commit point: data
files it does not name are leftovers of an interrupted write and are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import CorruptBankError, StorageError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 22


class HashingWriter:
    """A file object that also hashes (sha256) what is written to it."""

    def __init__(self, f: Any) -> None:
        self.f, self.h = f, hashlib.sha256()

    def write(self, b: Any) -> int:
        self.h.update(b)
        return int(self.f.write(b))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: Path, write: Any) -> str:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            hw = HashingWriter(f)
            write(hw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc}") from exc
    fsync_dir(path.parent)
    return hw.h.hexdigest()


def write_array(path: Path, a: np.ndarray) -> str:
    """Write `a` as .npy atomically; return the sha256 of the file."""
    return _atomic(path, lambda f: np.lib.format.write_array(f, a, allow_pickle=False))


def write_with(path: Path, write: Any) -> str:
    """Write a file atomically through `write(f)` (f: a file that hashes what it is given);
    return its sha256."""
    return _atomic(path, write)


def write_bytes(path: Path, data: bytes) -> str:
    """Write raw bytes atomically; return their sha256."""
    return _atomic(path, lambda f: f.write(data))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_array(
    path: Path, sha256: str, shape: tuple[int, ...], dtype: str, verify: bool = True
) -> np.ndarray:
    """Memory-map a .npy written by `write_array`, refusing it unless it is exactly what the
    manifest says. Copy-on-write mapping: pages are shared between processes until written."""
    try:
        if verify and sha256_file(path) != sha256:
            raise CorruptBankError(f"{path.name}: checksum mismatch (file altered or truncated)")
        a = np.load(path, mmap_mode="c", allow_pickle=False)
    except FileNotFoundError as exc:
        raise CorruptBankError(f"{path.name}: missing data file") from exc
    except (ValueError, OSError) as exc:
        raise CorruptBankError(f"{path.name}: unreadable array ({exc})") from exc
    if a.shape != shape or a.dtype != np.dtype(dtype):
        raise CorruptBankError(
            f"{path.name}: holds {a.dtype}{a.shape}, manifest says {dtype}{shape}"
        )
    return a


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: Path, body: dict[str, Any]) -> None:
    doc = {**body, "format_version": FORMAT_VERSION, "manifest_sha256": _digest(body)}
    data = json.dumps(doc, indent=1, sort_keys=True).encode()
    write_bytes(directory / MANIFEST, data)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise StorageError(f"{directory}: no bank here ({MANIFEST} missing)") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptBankError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise CorruptBankError(f"{path}: not a JSON object")
    version = doc.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CorruptBankError(f"{path}: format version {version!r}, expected {FORMAT_VERSION}")
    if doc.pop("manifest_sha256", None) != _digest(doc):
        raise CorruptBankError(f"{path}: checksum mismatch (manifest altered)")
    return doc


def spill_rows(path: Path, src: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`src[rows]` (m, d) written to the .npy file `path` block by block and mapped (copy on
    write, as a bank's segments are; never written): a copy held in the page cache, which the
    kernel may evict, never whole in this process's own memory. A scratch file for this
    process, not a bank's: not fsynced."""
    m, d = len(rows), src.shape[1]
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(m, d))
    step = max(1, _CHUNK // max(1, d * src.itemsize))
    for i in range(0, m, step):
        out[i : i + step] = src[rows[i : i + step]]
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="c")  # as a bank's own segments are: torch takes them
