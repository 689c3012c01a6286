"""`vqsearch load --bank NAME FILES...`: vectors from `.npy` / `.npz` files written straight
into a bank of a data dir, without HTTP.

- It takes the data dir's writer lock, the one a server takes: one process writes a data dir,
  so it refuses while a server (not a read-only replica) runs on it, and a server started
  meanwhile refuses to start.
- Every file's shape is read from its header first: a file of another width or rank is named
  before anything is written.
- The bank is created if absent (d from the files, `--metric`) as the server creates one (a
  hidden directory renamed into place), else appended to.
- Rows go in slabs of at most `--chunk-bytes`, each a segment made durable before the next:
  an interrupted load leaves the bank with the slabs written so far, every one whole. Memory:
  one slab (files are memory-mapped, `.npz` members read one at a time).
- A server started afterwards serves the bank; an index it had is stale and rebuilt.

Files: `.npy` holding an (n, d) float array, or `.npz` with a `vectors` member and optionally
`ids` (as the HTTP API takes them); default ids continue from the bank's largest.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

CHUNK_BYTES = 256 << 20


class LoadError(Exception):
    """A load that cannot start or go on; its message is the one line the CLI prints."""


def _header(f: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    fmt = np.lib.format
    major, _ = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
    shape, _, dtype = read(f)
    return tuple(shape), np.dtype(dtype)


def shape_of(path: Path) -> tuple[int, ...]:
    """The vectors' shape from the file's header (an .npz's `vectors` member), no data read."""
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                if "vectors.npy" not in z.namelist():
                    raise LoadError(f"{path}: an .npz needs a 'vectors' member")
                with z.open("vectors.npy") as f:
                    shape, dtype = _header(f)
        else:
            with open(path, "rb") as f:
                shape, dtype = _header(f)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise LoadError(f"{path}: not a readable .npy / .npz ({exc})") from exc
    if dtype.kind not in "fiu":
        raise LoadError(f"{path}: holds {dtype}; vectors are numbers")
    return shape


def slabs(path: Path, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(vectors, ids or None) of at most `rows` rows at a time."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            x = z["vectors"]
            ids = z["ids"] if "ids" in z.files else None
    else:
        x, ids = np.load(path, mmap_mode="r", allow_pickle=False), None
    if ids is not None and ids.shape != x.shape[:1]:
        raise LoadError(f"{path}: {len(ids)} ids for {len(x)} vectors")
    for a in range(0, len(x), rows):
        yield np.asarray(x[a : a + rows]), None if ids is None else ids[a : a + rows]


class Progress:
    """A bar on a terminal, else a line at every tenth of the way."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.out, self.done, self.t0 = total, out, 0, time.monotonic()
        self.tty, self.shown = out.isatty(), -1

    def add(self, n: int) -> None:
        self.done += n
        frac = self.done / max(self.total, 1)
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        line = f"[{bar}] {frac:4.0%} {self.done:,}/{self.total:,} vectors, {rate:,.0f} vectors/s"
        if self.tty:
            self.out.write("\r" + line + ("\n" if self.done >= self.total else ""))
        elif int(10 * frac) > self.shown:
            self.shown = int(10 * frac)
            self.out.write(line + "\n")
        self.out.flush()


def load(
    data_dir: Path,
    name: str,
    files: list[Path],
    metric: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    out: TextIO = sys.stderr,
) -> int:
    """Append the files' rows to bank `name` of `data_dir` (created if absent, with `metric`,
    default l2; an existing bank must have it) -> rows added."""
    from vqsearch.index import Bank
    from vqsearch.service._deps import NAME_PATTERN
    from vqsearch.service._lock import DataDirLock, DataDirLockedError

    if not re.fullmatch(NAME_PATTERN, name):  # as the service checks it: no trailing newline
        raise LoadError(f"bank name {name!r} must match {NAME_PATTERN}")
    shapes = [shape_of(f) for f in files]
    bad = [f"{f} {s}" for f, s in zip(files, shapes, strict=True) if len(s) != 2]
    if bad:
        raise LoadError(f"vectors are (n, d) matrices: {', '.join(bad)}")
    path = Path(data_dir) / "banks" / name
    lock = DataDirLock(Path(data_dir))
    try:
        lock.acquire()
    except DataDirLockedError as exc:
        raise LoadError(str(exc)) from exc
    try:
        if not (path / "manifest.json").exists():
            tmp = path.parent / f".{name}.{uuid.uuid4().hex}"
            Bank.create(tmp, shapes[0][1], metric or "l2")  # type: ignore[arg-type]
            tmp.rename(path)
        bank = Bank.open(path, auto_compact=False)
        if metric is not None and metric != bank.metric:
            raise LoadError(f"bank {name!r} has metric {bank.metric}, not {metric}")
        wrong = [f"{f} (d={s[1]})" for f, s in zip(files, shapes, strict=True) if s[1] != bank.d]
        if wrong:
            raise LoadError(f"bank {name!r} has d={bank.d}: {', '.join(wrong)}")
        total = sum(s[0] for s in shapes)
        progress = Progress(total, out)
        rows = max(1, chunk_bytes // (4 * bank.d))
        for f in files:
            for x, ids in slabs(f, rows):
                bank.add(x, ids)
                progress.add(len(x))
        if bank.needs_compaction:
            out.write(f"compacting {bank.num_segments} segments into one\n")
            bank.compact()
        out.write(f"bank {name!r}: {bank.ntotal:,} vectors, version {bank.version}\n")
        return total
    finally:
        lock.release()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bank", required=True, help="the bank's name (created if absent)")
    parser.add_argument("files", nargs="+", type=Path, help=".npy (n, d) or .npz with 'vectors'")
    parser.add_argument(
        "--metric", choices=["l2", "ip", "cosine"], help="of a new bank (default l2)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("VQSEARCH_DATA_DIR", "./data")),
        help="the server's data dir (default: VQSEARCH_DATA_DIR or ./data)",
    )
    parser.add_argument(
        "--chunk-bytes", type=int, default=CHUNK_BYTES, help="vectors per segment written"
    )


def run(args: argparse.Namespace) -> int:
    from vqsearch.index import VQSearchError

    try:
        load(args.data_dir, args.bank, args.files, args.metric, args.chunk_bytes)
    except (LoadError, VQSearchError, OSError) as exc:
        print(f"vqsearch load: {exc}", file=sys.stderr)
        return 1
    return 0
