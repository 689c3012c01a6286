"""Compaction by streaming: a snapshot's live rows (of all its segments, or of a run at the end:
`fold_from`) copied block by block into one new segment file, with no lock held and O(block)
memory, then swapped in over whatever was written since.

Two steps, so that a caller can decide in between whether the swap may still happen (the
service checks that the bank was not deleted meanwhile):

- `prepare(snapshot, directory, name)` writes the live rows to `compact-*.part` files (never
  read by `Bank.open`, which removes them as leftovers) and computes the new segment's sums;
- `Bank.finish_compaction` renames them into place and commits, carrying over the rows that
  were appended or deleted after the snapshot.

Segments are only ever appended, so the rows of the snapshot are the first rows of any later
state, in the same order: a deletion after the snapshot is read off the later dead mask at the
snapshot's live rows.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import _storage as st
from ._state import Segment, State

BLOCK_BYTES = 32 << 20  # rows copied at a time
PART = ".part"
PART_PREFIX = "compact-"


@dataclass(frozen=True)
class Compaction:
    """A prepared compaction of `snapshot`'s segments from `first` on: the new segment,
    written under part names."""

    snapshot: State
    segment: Segment  # vectors: the part file mapped (or the rows, for a bank in memory)
    parts: dict[str, Path]  # "vectors" / "ids" -> part file
    first: int = 0  # the segments before it stay as they are

    def discard(self) -> None:
        for p in self.parts.values():
            p.unlink(missing_ok=True)


def _write_part(path: Path, write: Callable[[st.HashingWriter], None]) -> str:
    """A part file, fsynced; returns its sha256."""
    with open(path, "wb") as f:
        hw = st.HashingWriter(f)
        write(hw)
        f.flush()
        os.fsync(f.fileno())
    return hw.h.hexdigest()


def fold_from(state: State, max_dead_fraction: float) -> int:
    """Which segments a compaction folds: from the returned one to the last. All of them
    where dead rows pile up (only a full fold drops every tombstone); else the longest run
    at the end in which each segment holds no more rows than the ones after it, and at least
    two. Appends of equal size then merge into segments that grow geometrically, so a row
    is rewritten about log(nb / append) times over a bank's life, not at every fold."""
    sizes = [len(s.ids) for s in state.segments]
    if len(sizes) <= 1 or state.dead.sum() > max_dead_fraction * max(len(state.dead), 1):
        return 0
    first, acc = len(sizes) - 2, sizes[-1] + sizes[-2]
    while first > 0 and sizes[first - 1] <= acc:
        first -= 1
        acc += sizes[first]
    return first


def prepare(snapshot: State, directory: Path | None, name: str, first: int = 0) -> Compaction:
    start = int(snapshot.offsets[first])
    live = snapshot.live_rows[snapshot.live_rows >= start]
    ids = np.ascontiguousarray(snapshot.all_ids[live])
    n, d = len(live), snapshot.d
    content = hashlib.sha256()  # of the vector bytes, then the id bytes (`content_sha`)
    block = max(1, BLOCK_BYTES // (4 * d))
    if directory is None:  # a bank in memory: the rows themselves
        vec = snapshot.take(torch.from_numpy(live)).numpy()
        content.update(vec.tobytes())
        content.update(ids.tobytes())
        return Compaction(snapshot, Segment(name, vec, ids, content.hexdigest()), {}, first)
    tag = uuid.uuid4().hex
    parts = {k: directory / f"{PART_PREFIX}{tag}.{k}{PART}" for k in ("vectors", "ids")}
    try:

        def vectors(f: st.HashingWriter) -> None:
            header = {"descr": "<f4", "fortran_order": False, "shape": (n, d)}
            np.lib.format.write_array_header_1_0(f, header)
            for a in range(0, n, block):
                rows = snapshot.take(torch.from_numpy(live[a : a + block])).numpy()
                raw = rows.data  # a fresh C-contiguous block: its buffer, no copy
                content.update(raw)
                f.write(raw)

        vec_sha = _write_part(parts["vectors"], vectors)
        content.update(ids.tobytes())
        ids_sha = _write_part(
            parts["ids"], lambda f: np.lib.format.write_array(f, ids, allow_pickle=False)
        )
        vec = st.read_array(parts["vectors"], vec_sha, (n, d), "float32", verify=False)
    except OSError as exc:
        for p in parts.values():
            p.unlink(missing_ok=True)
        raise st.StorageError(f"cannot compact into {directory}: {exc}") from exc
    files = {"vectors": vec_sha, "ids": ids_sha}
    return Compaction(snapshot, Segment(name, vec, ids, content.hexdigest(), files), parts, first)


def install(c: Compaction, directory: Path) -> None:
    """The part files renamed to the segment's names (then the manifest may name them)."""
    for kind, part in c.parts.items():
        os.replace(part, directory / f"{c.segment.name}.{kind}.npy")
    st.fsync_dir(directory)


def merged(c: Compaction, current: State) -> State | None:
    """`current` with the snapshot's segments from `first` on replaced by the compacted one;
    None if `current` no longer starts with the snapshot's (another compaction came first)."""
    snap, k = c.snapshot, len(c.snapshot.segments)
    if current.segments[:k] != snap.segments:  # identity: segments are never copied
        return None
    start, n = int(snap.offsets[c.first]), len(snap.dead)
    folded = snap.live_rows[snap.live_rows >= start]
    dead = np.concatenate([current.dead[:start], current.dead[folded], current.dead[n:]])
    return State(
        current.d,
        (*current.segments[: c.first], c.segment, *current.segments[k:]),
        dead,
        current.generation,  # no row changed: neither generation nor version
        stamp=current.version,
    )
