"""A bank: float32 vectors (nb, d), int64 ids and a metric, searched exactly, persisted in segments.

On disk (when the bank has a directory) an append writes a new immutable segment, a deletion a
tombstone file of dead rows, and each write ends by atomically replacing the manifest: an append
never rewrites the bank. `compact` folds the live rows into one segment, streaming them
(`_compact`); a bank runs it after the write that piles up segments or tombstones, or, opened
with `auto_compact=False`, leaves it to its owner (the service runs it in the background). A
method that changes the bank returns only once the change is durable.

Readers never lock: each operation reads one immutable `State`; writers, serialised by a lock,
build a new state and swap it in, so a reader sees the bank before or after a write, never half.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _compact
from . import _storage as st
from ._errors import DuplicateIdError, EmptyBankError, InvalidIdError, RankError, StorageError
from ._exact import exact_search
from ._index_rows import BankRows
from ._state import Segment, State, content_sha
from ._validate import (
    Metric,
    MetricName,
    Queries,
    as_matrix,
    as_tensor,
    check_k,
    check_metric,
    normalize,
    resolve_device,
)

MAX_SEGMENTS = 16
MAX_DEAD_FRACTION = 0.25
MAX_ID = int(np.iinfo(np.int64).max)


def as_ids(ids: Any, name: str = "ids") -> np.ndarray:
    """Array-like of integer ids -> (n,) int64; ids are >= 0 (faiss uses -1 for 'no result')."""
    t = as_tensor(ids, name)
    if t.ndim != 1:
        raise RankError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if not bool((t == t.round()).all()):
            raise InvalidIdError(f"{name} must be integers")
        if t.numel() and float(t.abs().max()) >= 2.0**63:
            raise InvalidIdError(f"{name} must be below 2**63 (int64)")
    a = t.cpu().numpy().astype(np.int64)
    if (a < 0).any():
        raise InvalidIdError(f"{name} must be >= 0; got {int(a.min())}")
    return a


class Bank:
    """Vectors with ids and a metric; exact search; durable appends and deletions.

    ``Bank(d, metric)`` lives in memory; ``Bank.create(path, d, metric)`` and ``Bank.open(path)``
    keep it in a directory. Under ``cosine`` the vectors are stored L2-normalised.
    """

    def __init__(
        self,
        d: int,
        metric: MetricName | Metric = "l2",
        path: str | Path | None = None,
        auto_compact: bool = True,
    ) -> None:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise RankError(f"d must be a positive integer; got {d!r}")
        self._metric = check_metric(metric)
        self.d, self.metric = d, self._metric.name
        self.path = Path(path) if path is not None else None
        self.auto_compact = auto_compact
        self._state = State(d, (), np.zeros(0, bool), 0)
        self._next_seg = 0
        self._lock = threading.Lock()
        self._compacting = threading.Lock()  # one compaction at a time

    # -- persistence -------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | Path, d: int, metric: MetricName | Metric = "l2", auto_compact: bool = True
    ) -> Bank:
        bank = cls(d, metric, path, auto_compact)
        p = Path(path)
        if (p / st.MANIFEST).exists():
            raise StorageError(f"{p}: a bank already exists here")
        p.mkdir(parents=True, exist_ok=True)
        bank._commit(bank._state)
        return bank

    @classmethod
    def open(
        cls,
        path: str | Path,
        verify: bool = True,
        writable: bool = True,
        auto_compact: bool = True,
    ) -> Bank:
        """Load a bank, memory-mapping its vectors; refuses any file that fails its checksum.
        A writable opener removes leftovers of interrupted writes (one writer per directory)."""
        p = Path(path)
        m = st.read_manifest(p)
        try:
            bank = cls(int(m["d"]), m["metric"], p, auto_compact)
            segs = []
            for s in m["segments"]:
                n, f = int(s["n"]), s["files"]
                vec = st.read_array(
                    p / f"{s['name']}.vectors.npy", f["vectors"], (n, bank.d), "float32", verify
                )
                ids = st.read_array(p / f"{s['name']}.ids.npy", f["ids"], (n,), "int64", verify)
                segs.append(Segment(s["name"], vec, ids, s["content"], dict(f)))
            dead = np.zeros(sum(len(s.ids) for s in segs), bool)
            if m["tombstones"] is not None:
                t = m["tombstones"]
                rows = st.read_array(p / t["file"], t["sha256"], (int(t["n"]),), "int64", verify)
                dead[rows] = True
            stamp = m.get("version")  # absent in banks written before versions were chained
            bank._state = State(bank.d, tuple(segs), dead, int(m["generation"]), stamp=stamp)
            bank._next_seg = int(m["next_segment"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise st.CorruptBankError(f"{p}: manifest is inconsistent ({exc!r})") from exc
        if writable:
            bank._remove_unreferenced(bank._state, m["tombstones"], parts=True)
        return bank

    def save(self, path: str | Path) -> Bank:
        """Write a compacted copy of this bank to a new directory and return it, opened: the
        live rows streamed block by block, then folded into one segment."""
        out = Bank.create(path, self.d, self.metric, auto_compact=False)
        for x, ids in BankRows(self._state).blocks():
            out.add(x, ids)
        out.compact()
        out.auto_compact = self.auto_compact
        return out

    def _commit(self, state: State) -> State:
        """Make `state` durable (its new files first, the manifest last), then publish it."""
        if self.path is not None:
            segs = []
            for s in state.segments:
                if not s.files:
                    vpath = self.path / f"{s.name}.vectors.npy"
                    files = {
                        "vectors": st.write_array(vpath, s.vectors),
                        "ids": st.write_array(self.path / f"{s.name}.ids.npy", s.ids),
                    }
                    # from now on the rows are read from the file (page cache, which the
                    # kernel may evict), not from the writer's copy in anonymous memory:
                    # otherwise every append since the last compaction stays resident
                    vec = st.read_array(vpath, files["vectors"], s.vectors.shape, "float32", False)
                    s = Segment(s.name, vec, s.ids, s.content, files)
                segs.append(s)
            tomb = None
            dead_rows = np.flatnonzero(state.dead).astype(np.int64)
            if len(dead_rows):
                # a name of its own: a compaction commits dead rows at the same generation,
                # and the file the current manifest names must stay as it is until replaced
                name = f"tomb-{state.generation:08d}-{uuid.uuid4().hex[:8]}.npy"
                tomb = {
                    "file": name,
                    "n": len(dead_rows),
                    "sha256": st.write_array(self.path / name, dead_rows),
                }
            state = State(self.d, tuple(segs), state.dead, state.generation, stamp=state.stamp)
            st.write_manifest(
                self.path,
                {
                    "d": self.d,
                    "metric": self.metric,
                    "dtype": "float32",
                    "nb": state.ntotal,
                    "generation": state.generation,
                    "version": state.version,
                    "next_segment": self._next_seg,
                    "tombstones": tomb,
                    "segments": [
                        {"name": s.name, "n": len(s.ids), "content": s.content, "files": s.files}
                        for s in state.segments
                    ],
                },
            )
            self._remove_unreferenced(state, tomb)
        self._state = state
        return state

    def _remove_unreferenced(
        self, state: State, tomb: dict[str, Any] | None, parts: bool = False
    ) -> None:
        """Delete bank files the manifest no longer names (superseded, or left by a crash);
        with `parts`, at open, also a compaction's part files (one may be under way later).
        Processes that still map a deleted file keep reading it: unlinking does not unmap."""
        assert self.path is not None
        keep = {f"{s.name}.{kind}.npy" for s in state.segments for kind in ("vectors", "ids")}
        if tomb is not None:
            keep.add(tomb["file"])
        for f in self.path.iterdir():
            stale = f.name.startswith(("seg-", "tomb-", ".")) and f.suffix in (".npy", ".tmp")
            part = parts and f.name.startswith(_compact.PART_PREFIX) and f.suffix == _compact.PART
            if f.name not in keep and (stale or part):
                f.unlink(missing_ok=True)

    # -- reading -----------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        """Number of live vectors."""
        return self._state.ntotal

    @property
    def generation(self) -> int:
        """Incremented by every write that changes rows (add, remove); a compaction keeps it."""
        return self._state.generation

    @property
    def version(self) -> str:
        """Identifies the rows: a hash chained over the writes that made them (equal write
        histories, equal versions; a changed row, another version). A compaction keeps it."""
        return self._state.version

    @property
    def needs_compaction(self) -> bool:
        """Segments or tombstones have piled up (MAX_SEGMENTS, MAX_DEAD_FRACTION)."""
        state = self._state
        many_dead = state.dead.sum() > MAX_DEAD_FRACTION * max(len(state.dead), 1)
        return bool(len(state.segments) > MAX_SEGMENTS or many_dead)

    @property
    def nbytes(self) -> int:
        return sum(s.vectors.nbytes + s.ids.nbytes for s in self._state.segments)

    @property
    def num_segments(self) -> int:
        return len(self._state.segments)

    def mapped_files(self) -> set[Path]:
        """The files this bank's rows are memory-mapped from (none for rows in memory)."""
        arrays = (seg.vectors for seg in self._state.segments)
        return {Path(a.filename) for a in arrays if isinstance(a, np.memmap) and a.filename}

    def ids(self) -> np.ndarray:
        """Live ids (ntotal,) in storage order."""
        state = self._state
        return state.all_ids[state.live_rows]

    def vectors(self) -> np.ndarray:
        """Live vectors (ntotal, d) in the order of `ids()` (a copy)."""
        return self._live_vectors(self._state)

    @staticmethod
    def _live_vectors(state: State) -> np.ndarray:
        return state.take(torch.from_numpy(state.live_rows)).numpy()

    def get(self, ids: Any) -> np.ndarray:
        """Vectors (n, d) of the given ids, in that order; UnknownIdError if any is missing.
        Works for ids of any shape: the result has shape ids.shape + (d,)."""
        state = self._state
        a = as_tensor(ids, "ids")
        flat = as_ids(a.reshape(-1))
        rows = state.rows_of(flat)
        return state.take(torch.from_numpy(rows)).numpy().reshape(*a.shape, self.d)

    def _queries(self, xq: Any) -> torch.Tensor:
        if isinstance(xq, Queries):
            return xq.trusted_by(self.d, self.metric)
        x = as_matrix(xq, "xq", self.d)
        if self._metric.unit:
            normalize(x, "xq")  # raises on a zero query
        return x

    def search(
        self, xq: Any, k: int, device: str = "auto", precision: str = "auto"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k. xq (nq, d) -> D (nq, k) float32, I (nq, k) int64 ids.
        l2: squared distances ascending; ip and cosine: similarities descending.
        precision: the candidate scan's (see `knn`); the answer is exact in all."""
        state = self._state
        if state.ntotal == 0:
            raise EmptyBankError("the bank is empty")
        D, I = self._exact(self._queries(xq), check_k(k, state.ntotal), device, precision)
        return to_reported(D, self._metric), I.numpy()

    def _exact(
        self, x: torch.Tensor, k: int, device: str, precision: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact driver on this bank's rows: float64 D, I for 1 <= k <= ntotal."""
        state = self._state
        center = state.center(self._metric)
        dev = resolve_device(device)
        return exact_search(x, state, center, self._metric, k, dev, precision=precision)

    def search64(
        self, xq: Any, k: int, device: str = "auto", precision: str = "auto"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k as `merge_shards` takes it: D (nq, k') float64 'smaller is nearer' (the
        float64 formula's own value, a function of the query and the row alone), I (nq, k')
        ids, k' = min(k, ntotal); an empty bank gives k' = 0."""
        x = self._queries(xq)
        k = min(k, self._state.ntotal)
        if k == 0:
            return np.empty((len(x), 0), np.float64), np.empty((len(x), 0), np.int64)
        return tuple(to_host(*self._exact(x, k, device, precision)))  # type: ignore[return-value]

    def snapshot(self, metric: MetricName | Metric | None = None) -> Bank:
        """This bank's rows as they are now: a bank in memory that no later write changes,
        sharing this one's segments (memory maps stay maps: nothing is copied). `metric`:
        the same rows, as stored, searched under another metric."""
        out = Bank(self.d, metric or self._metric, auto_compact=False)
        out._state = self._state
        return out

    def shard(self, s: int, n: int, reuse: Bank | None = None, spill: Path | None = None) -> Bank:
        """Shard s of n: a bank of copies (a snapshot: writes to it change it alone) holding
        the rows whose id % n == s, their float32 values as stored (not normalised again),
        dead where they are dead here, at this bank's version. An id always lands on the
        same shard, whatever was appended or removed before.

        reuse: an earlier shard s of n of this bank; its copies of the segments both have
        are taken as they are (segments never change once written), so reading a bank
        again after a write copies only the new segments' rows.
        spill: a directory of this process's own for the copies, one .npy file a segment,
        memory-mapped (the page cache holds them, not this process); None: in memory."""
        if not 0 <= s < n:
            raise RankError(f"shard {s} of {n}: need 0 <= shard < shards")
        state = self._state
        held = {g.content: g for g in reuse._state.segments} if reuse is not None else {}
        segs, dead = [], []
        for i, seg in enumerate(state.segments):
            off = int(state.offsets[i])
            mine = seg.ids % n == s
            if not mine.any():
                continue
            # a shard's segment is named by its source's content and the shard: the same
            # source rows, the same shard rows
            key = f"{seg.content}:{s}/{n}"
            got = held.get(key)
            if got is None:
                if spill is None:
                    vec = np.ascontiguousarray(seg.vectors[mine])
                else:
                    rows = np.flatnonzero(mine)
                    vec = st.spill_rows(spill / f"{seg.content}-{s}-{n}.npy", seg.vectors, rows)
                got = Segment(seg.name, vec, seg.ids[mine], key)
            segs.append(got)
            dead.append(state.dead[off : off + len(seg.ids)][mine])
        out = Bank(self.d, self._metric, auto_compact=False)
        rows = np.concatenate(dead) if dead else np.zeros(0, bool)
        out._state = State(self.d, tuple(segs), rows, state.generation, stamp=state.version)
        return out

    def nearest(
        self, xq: Any, device: str = "auto", precision: str = "auto"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest code of every query: xq (nq, d) -> D (nq,) float32, I (nq,) int64."""
        D, I = self.search(xq, 1, device, precision)
        return D[:, 0], I[:, 0]

    # -- writing -----------------------------------------------------------------------------

    def add(self, xb: Any, ids: Any = None) -> np.ndarray:
        """Append vectors (n, d); ids default to max id + 1 onwards. Returns the ids added.
        No vectors: nothing is written and the generation stays."""
        x = as_matrix(xb, "xb", self.d)
        if self._metric.unit:
            x = normalize(x, "xb")
        vec = x.cpu().numpy()  # may be the caller's own buffer (as_matrix copies only to convert)
        if self.path is None:
            vec = vec.copy()  # a bank in memory keeps its rows; a bank on disk maps its file
        with self._lock:
            state = self._state
            if ids is None:
                start = int(state.all_ids.max()) + 1 if len(state.all_ids) else 0
                if start + len(vec) - 1 > MAX_ID:
                    raise InvalidIdError(
                        f"default ids would run past {MAX_ID} (the bank's largest id is "
                        f"{start - 1}); give ids explicitly"
                    )
                new_ids = np.arange(start, start + len(vec), dtype=np.int64)
            else:
                new_ids = as_ids(ids)
                if len(new_ids) != len(vec):
                    raise RankError(f"got {len(new_ids)} ids for {len(vec)} vectors")
                uniq, counts = np.unique(new_ids, return_counts=True)
                if (counts > 1).any():
                    raise DuplicateIdError(
                        f"ids repeated in the batch: {uniq[counts > 1][:10].tolist()}"
                    )
                taken = np.isin(new_ids, state.all_ids[state.live_rows])
                if taken.any():
                    raise DuplicateIdError(
                        f"ids already in the bank: {new_ids[taken][:10].tolist()}"
                    )
            if len(vec) == 0:
                return new_ids
            seg = Segment(f"seg-{self._next_seg:08d}", vec, new_ids, content_sha(vec, new_ids))
            self._next_seg += 1
            dead = np.concatenate([state.dead, np.zeros(len(vec), bool)])
            stamp = _chain(state.version, b"add", seg.content.encode())
            self._commit(
                State(self.d, (*state.segments, seg), dead, state.generation + 1, stamp=stamp)
            )
        self._compact_if_needed()
        return new_ids

    def remove(self, ids: Any) -> int:
        """Delete the given ids (all or none: UnknownIdError if any is missing). Returns count.
        No ids: nothing is written and the generation stays."""
        flat = np.unique(as_ids(ids))
        if len(flat) == 0:  # a write that changes nothing changes no version
            return 0
        with self._lock:
            state = self._state
            rows = state.rows_of(flat)
            dead = state.dead.copy()
            dead[rows] = True
            stamp = _chain(state.version, b"remove", flat.tobytes())
            self._commit(State(self.d, state.segments, dead, state.generation + 1, stamp=stamp))
        self._compact_if_needed()
        return len(rows)

    def _compact_if_needed(self) -> None:
        if self.auto_compact and self.needs_compaction:
            self.compact(full=False)

    def compact(self, full: bool = True) -> bool:
        """Fold the live rows into one segment and drop the tombstones, streaming them (memory
        of a block, not of the bank); reads and writes go on meanwhile. `full=False`: fold
        only what `_compact.fold_from` picks (what automatic compaction does). Returns whether
        it compacted (not when another compaction came first)."""
        plan = self.prepare_compaction(full)
        return plan is not None and self.finish_compaction(plan)

    def prepare_compaction(self, full: bool = False) -> _compact.Compaction | None:
        """Step one of `compact`: the live rows of the bank as it is now (all its segments
        with `full`, else those `_compact.fold_from` picks), written to part files (no lock
        held while they are written). None when there is nothing to fold."""
        with self._lock:
            state = self._state
            if len(state.segments) <= 1 and not state.dead.any():
                return None
            first = 0 if full else _compact.fold_from(state, MAX_DEAD_FRACTION)
            name = f"seg-{self._next_seg:08d}"
            self._next_seg += 1
        with self._compacting:
            return _compact.prepare(state, self.path, name, first)

    def finish_compaction(self, plan: _compact.Compaction) -> bool:
        """Step two: swap the compacted segment in, keeping what was written since step one."""
        with self._lock:
            state = _compact.merged(plan, self._state)
            if state is None:
                plan.discard()
                return False
            if self.path is not None:
                _compact.install(plan, self.path)
            self._commit(state)
            return True


def _chain(version: str, *parts: bytes) -> str:
    """The version after a write: the previous one hashed with what the write did."""
    h = hashlib.sha256(version.encode())
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def to_reported(D: torch.Tensor, metric: Metric) -> np.ndarray:
    """`Metric.reported`, as a NumPy array."""
    return to_host(metric.reported(D))[0]


def to_host(*ts: torch.Tensor) -> list[np.ndarray]:
    """The tensors as NumPy arrays. From a GPU through pinned memory with one sync for all:
    pageable copies of a 262,144-query result (3 MiB) took 0.47 ms on an H200."""
    if not any(t.is_cuda for t in ts):
        return [t.numpy() for t in ts]
    outs = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in ts]
    for o, t in zip(outs, ts, strict=True):
        o.copy_(t, non_blocking=True)
    torch.cuda.current_stream(ts[0].device).synchronize()
    return [o.numpy() for o in outs]
