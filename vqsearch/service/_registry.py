"""Banks on disk: one directory per bank under `<data_dir>/banks/`, each with its approximate
index in `index/`. Creation builds the bank in a temporary directory and renames it into place;
deletion renames it into `trash/` first: a crash leaves a bank whole or absent.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from vqsearch.index import (
    ApproxIndex,
    Bank,
    Metric,
    StorageError,
    VQSearchError,
    atomic_write,
    default_spec,
)

from ._lock import DataDirLock
from ._sampling import Reservoir, Usage

log = logging.getLogger("vqsearch")
INDEX_FILE = "index/index.faiss"
BUILDING_FILE = "index/building.json"  # present while a build runs: a crash leaves it behind
TRADEOFF_FILE = "tradeoff.json"


class _Named(str, Enum):
    """A state that is its value everywhere: JSON, ==, str() and f-strings."""

    def __str__(self) -> str:
        return str(self.value)


class Phase(_Named):
    """Where an index build is, as `index.state` reports it."""

    QUEUED = "queued"
    TRAINING = "training"
    SAVING = "saving"
    READY = "ready"  # the index serves the bank's current version
    STALE = "stale"  # it served an earlier version; no build of this one is under way
    FAILED = "failed"


class SweepPhase(_Named):
    NONE = "none"
    QUEUED = "queued"
    BUILDING = "building index"
    MEASURING = "measuring"
    DONE = "done"
    FAILED = "failed"


RUNNING = (Phase.TRAINING, Phase.SAVING)  # a build that has read the bank and not yet finished


class BankExistsError(Exception):
    pass


class UnknownBankError(Exception):
    pass


class DeletedBankError(UnknownBankError):
    """The bank was deleted while a request on it was under way: its write must not land."""


class ReadOnlyError(Exception):
    pass


class LimitError(Exception):
    """A configured limit (named in the message) would be exceeded."""


@dataclass(frozen=True)
class Limits:
    max_d: int = 65536
    max_bank_vectors: int = 10_000_000
    max_banks: int = 1000


@dataclass
class IndexState:
    """The bank's approximate index as the API reports it: a build under way, or the index
    that serves (ready) or served until a write (stale)."""

    spec: str
    state: Phase = Phase.QUEUED
    progress: float = 0.0
    error: str | None = None
    bank_version: str | None = None
    build_seconds: float | None = None
    train_size: int | None = None

    def info(self, index: ApproxIndex | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec,
            "state": self.state,
            "progress": self.progress,
            "error": self.error,
            "bank_version": self.bank_version,
            "build_seconds": self.build_seconds,
        }
        if index is not None:
            out |= {
                "nprobe": index.nprobe,
                "k_factor": index.k_factor,
                "nlist": index.nlist,
                "ntotal": index.ntotal,
            }
        return out


@dataclass
class Entry:
    name: str
    bank: Bank
    index: ApproxIndex | None = None  # set only while it matches the bank's content
    build: IndexState | None = None  # what the API reports: the latest build, or `working`
    working: IndexState | None = None  # the last index that built: what writes rebuild
    dead: bool = False  # deleted: every writer holding this entry is refused (under `lock`)
    compacting: bool = False  # a compaction is queued or under way (under `lock`)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reservoir: Reservoir | None = None
    usage: Usage | None = None
    stamp: tuple[int, ...] = ()  # what the files looked like when loaded (replicas compare)
    tradeoff: dict[str, Any] | None = None  # the last sweep's report
    sweep: dict[str, Any] = field(
        default_factory=lambda: {"state": SweepPhase.NONE, "progress": 0.0}
    )

    @property
    def version(self) -> str:
        """Content hash and generation: what `X-Vqsearch-Bank-Version` carries."""
        return f"{self.bank.version}-{self.bank.generation}"

    def info(self) -> dict[str, Any]:
        b = self.bank
        return {
            "name": self.name,
            "d": b.d,
            "count": b.ntotal,
            "metric": b.metric,
            "bytes": b.nbytes,
            "version": self.version,
            "generation": b.generation,
            "segments": b.num_segments,
            "max_id": int(b.ids().max()) if b.ntotal else None,
            "index": None if self.build is None else self.build.info(self.index),
            "tradeoff": self.sweep | {"measured": self.tradeoff is not None},
            "query_sample": None if self.reservoir is None else len(self.reservoir.sample()),
            "usage": None if self.usage is None else self.usage.summary(b.ids()),
        }


def _stamp(p: Path) -> tuple[int, ...]:
    """Change marks of a bank directory: manifest, index sidecar and sweep report mtimes."""
    files = (p / "manifest.json", p / (INDEX_FILE + ".json"), p / TRADEOFF_FILE)
    return tuple(f.stat().st_mtime_ns if f.exists() else 0 for f in files)


class Registry:
    """All banks of a data directory, loaded at start; index builds on one worker thread."""

    def __init__(
        self,
        root: Path,
        auto_rebuild: bool = True,
        read_only: bool = False,
        reservoir: int = 0,
        usage_window: int = 0,
        limits: Limits = Limits(),
    ) -> None:
        self.root, self.limits = Path(root), limits
        self.reservoir_size, self.usage_window = reservoir, usage_window
        self.read_only = read_only
        self.banks_dir, self.trash = self.root / "banks", self.root / "trash"
        self.auto_rebuild = auto_rebuild
        self.entries: dict[str, Entry] = {}
        self.loaded = False
        self._lock = threading.Lock()
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="vqsearch-build")
        # compactions stream the bank after the write that piled up its segments was answered
        self._compactor = ThreadPoolExecutor(1, thread_name_prefix="vqsearch-compact")
        self._dir_lock = DataDirLock(self.root)

    def load(self) -> None:
        """Open every bank; a writer first takes the data dir's lock (DataDirLockedError)."""
        if not self.read_only:
            self._dir_lock.acquire()
            self.banks_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.trash, ignore_errors=True)
        for p in sorted(self.banks_dir.iterdir()) if self.banks_dir.exists() else []:
            if p.name.startswith("."):
                if not self.read_only:
                    shutil.rmtree(p, ignore_errors=True)  # a creation that never finished
                continue
            try:
                self.entries[p.name] = self._open(p)
            except VQSearchError as exc:
                log.error("bank %s not loaded: %s", p.name, exc)
        self.loaded = True

    def _open(self, p: Path) -> Entry:
        bank = Bank.open(p, writable=not self.read_only, auto_compact=False)
        entry = Entry(p.name, bank, stamp=_stamp(p))
        self._load_index(entry)
        self._load_tradeoff(entry)
        self._attach(entry)
        return entry

    def refresh(self) -> None:
        """For read-only replicas: take up what the primary wrote since the last look (new,
        changed and deleted banks, rebuilt indexes, new sweeps). A bank caught mid-change is
        kept as it was and looked at again next time."""
        seen = set()
        for p in sorted(self.banks_dir.iterdir()) if self.banks_dir.exists() else []:
            if p.name.startswith("."):
                continue
            seen.add(p.name)
            old = self.entries.get(p.name)
            try:
                if old is not None and old.stamp == _stamp(p):
                    continue
                new = self._open(p)
            except (VQSearchError, OSError) as exc:
                log.warning("bank %s not refreshed: %s", p.name, exc)
                continue
            if old is not None:
                new.usage, new.reservoir = old.usage, old.reservoir
            self.entries[p.name] = new
        for name in set(self.entries) - seen:
            del self.entries[name]

    def _load_index(self, entry: Entry) -> None:
        assert entry.bank.path is not None
        path, building = entry.bank.path / INDEX_FILE, entry.bank.path / BUILDING_FILE
        crashed = _read_building(building)
        if crashed is not None and not self.read_only:
            building.unlink(missing_ok=True)
        if path.exists():
            try:
                index = ApproxIndex.load(path)
            except VQSearchError as exc:
                log.error("index of %s not loaded: %s", entry.name, exc)
                return
            entry.working = IndexState(
                index.spec,
                Phase.READY,
                1.0,
                bank_version=index.meta.get("bank_version"),
                build_seconds=index.meta.get("build_seconds"),
                train_size=index.meta.get("train_size"),
            )
            entry.build = replace(entry.working)
            if entry.build.bank_version == entry.version:
                entry.index = index
        if crashed is not None:
            # The process died while building: maybe the build killed it (faiss aborts on
            # some inputs). It is not tried again at start, where it could abort every start.
            error = (
                f"the build of {crashed!r} did not finish: the server stopped during it; "
                "not retried at start (PUT the index to try again)"
            )
            log.error("bank %s: %s", entry.name, error)
            base = entry.build or IndexState(crashed, Phase.FAILED)
            entry.build = replace(base, error=error)
            if entry.index is None and entry.working is not None:
                entry.build.state = Phase.STALE
        elif entry.working is not None and entry.index is None:
            entry.build = replace(entry.working, state=Phase.STALE)
            if self.auto_rebuild and not self.read_only:
                self._queue(entry, entry.working.spec, entry.working.train_size)

    def _attach(self, entry: Entry) -> None:
        if self.reservoir_size > 0:
            entry.reservoir = Reservoir(self.reservoir_size, entry.bank.d)
        if self.usage_window > 0:
            entry.usage = Usage(self.usage_window)

    def _load_tradeoff(self, entry: Entry) -> None:
        path = entry.bank.path / TRADEOFF_FILE  # type: ignore[operator]
        try:
            entry.tradeoff = json.loads(path.read_bytes())
            entry.sweep = {"state": SweepPhase.DONE, "progress": 1.0}
        except FileNotFoundError:
            pass
        except ValueError as exc:
            log.error("tradeoff report of %s not loaded: %s", entry.name, exc)

    def close(self) -> None:
        self._compactor.shutdown(wait=True, cancel_futures=True)
        self._builder.shutdown(wait=True, cancel_futures=True)
        self._dir_lock.release()

    def list(self) -> list[Entry]:
        """Every bank, by name (the same order across restarts)."""
        return sorted(self.entries.values(), key=lambda e: e.name)

    def get(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise UnknownBankError(f"no bank named {name!r}") from None

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("this server is a read-only replica; send writes to the primary")

    def create(self, name: str, d: int, metric: Metric, vectors: Any, ids: Any) -> Entry:
        self._writable()
        lim = self.limits
        if d > lim.max_d:
            raise LimitError(f"d={d} exceeds VQSEARCH_MAX_D={lim.max_d}")
        if vectors is not None and len(vectors) > lim.max_bank_vectors:
            raise LimitError(
                f"{len(vectors)} vectors exceed VQSEARCH_MAX_BANK_VECTORS={lim.max_bank_vectors}"
            )
        with self._lock:
            if name in self.entries:
                raise BankExistsError(f"bank {name!r} already exists")
            if len(self.entries) >= lim.max_banks:
                raise LimitError(
                    f"{len(self.entries)} banks: VQSEARCH_MAX_BANKS={lim.max_banks} reached"
                )
            tmp = self.banks_dir / f".{name}.{uuid.uuid4().hex}"
            try:
                bank = Bank.create(tmp, d, metric)
                if vectors is not None and len(vectors):
                    bank.add(vectors, ids)
                tmp.rename(self.banks_dir / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            bank = Bank.open(self.banks_dir / name, verify=False, auto_compact=False)
            entry = Entry(name, bank)
            self._attach(entry)
            self.entries[name] = entry
            return entry

    def delete(self, name: str) -> None:
        """Under the entry's lock: no write of the bank is under way, and every later one
        (from a request that got the entry before) finds it dead and lands nowhere, not in a
        new bank of the same name."""
        self._writable()
        with self._lock:
            entry = self.get(name)
            with entry.lock:
                self.trash.mkdir(exist_ok=True)
                assert entry.bank.path is not None
                entry.bank.path.rename(self.trash / f"{name}.{uuid.uuid4().hex}")
                entry.dead, entry.index = True, None
                del self.entries[name]
        shutil.rmtree(self.trash, ignore_errors=True)

    @staticmethod
    def _alive(entry: Entry) -> None:
        """Call under entry.lock before writing to the bank's directory."""
        if entry.dead:
            raise DeletedBankError(f"bank {entry.name!r} was deleted while this request ran")

    # -- writes and the index they make stale ---------------------------------------------------

    def add(self, entry: Entry, vectors: Any, ids: Any) -> np.ndarray:
        self._writable()
        with entry.lock:
            self._alive(entry)
            total, top = entry.bank.ntotal + len(vectors), self.limits.max_bank_vectors
            if total > top:
                raise LimitError(f"{total} vectors would exceed VQSEARCH_MAX_BANK_VECTORS={top}")
            generation = entry.bank.generation
            added = entry.bank.add(vectors, ids)
            if entry.bank.generation != generation:
                self._stale(entry)
                self._compact_later(entry)
            return added

    def remove(self, entry: Entry, ids: Any) -> int:
        self._writable()
        with entry.lock:
            self._alive(entry)
            generation = entry.bank.generation
            n = entry.bank.remove(ids)
            if entry.bank.generation != generation:
                self._stale(entry)
                self._compact_later(entry)
            return n

    def _compact_later(self, entry: Entry) -> None:
        """Under entry.lock: queue a compaction if the bank needs one and none is queued."""
        if entry.bank.needs_compaction and not entry.compacting:
            entry.compacting = True
            self._compactor.submit(self._compact, entry)

    def _compact(self, entry: Entry) -> None:
        """Stream the live rows into one segment (no lock held), then swap it in under the
        entry's lock unless the bank was deleted meanwhile. Rows do not change, nor does the
        version: the index and If-Match pins stay valid."""
        try:
            plan = entry.bank.prepare_compaction()
            with entry.lock:
                entry.compacting = False
                if plan is None:
                    return
                if entry.dead:
                    plan.discard()
                    return
                entry.bank.finish_compaction(plan)
                self._compact_later(entry)  # writes since the snapshot may need another
        except (StorageError, OSError) as exc:
            entry.compacting = False
            log.error("compaction of %s failed (the bank is unchanged): %s", entry.name, exc)

    def _stale(self, entry: Entry) -> None:
        """Under entry.lock, after a write: the index no longer holds the bank's content.
        Stop serving it and, with auto-rebuild, queue a build that reads the bank as it is
        now: of the spec being built if a build has already read the bank (it is superseded),
        else of the working spec. A queued build reads the bank when it starts: nothing to do.
        So every interleaving of writes and builds ends with a build of the bank's last
        version. A bank whose only build failed has no spec to rebuild."""
        entry.index = None
        job = entry.build
        if job is None or job.state == Phase.QUEUED:
            return
        again = job if job.state in RUNNING else entry.working
        if again is None:
            return
        if self.auto_rebuild:
            self._queue(entry, again.spec, again.train_size)
        elif job.state not in RUNNING:
            entry.build = replace(job, state=Phase.STALE)

    def build_index(
        self, entry: Entry, spec: str | None, train_size: int | None = None
    ) -> IndexState:
        """Queue a build of `spec` (default: from the bank's size and width); the current
        index (if any) serves until the new one is ready."""
        self._writable()
        with entry.lock:
            self._alive(entry)
            b = entry.bank
            return self._queue(entry, spec or default_spec(b.ntotal, b.d), train_size)

    def build_now(self, entry: Entry) -> IndexState:
        """Build the default index on the calling thread (the builder's own: sweeps)."""
        with entry.lock:
            b = entry.bank
            state = entry.build = IndexState(default_spec(b.ntotal, b.d))
        self._build(entry, state)
        return state

    def background(self, fn: Any, *args: Any) -> Future[Any]:
        """Run a write job (a sweep) on the build thread, after the builds queued before it."""
        self._writable()
        return self._builder.submit(fn, *args)

    def write_file(self, entry: Entry, name: str, data: bytes) -> None:
        """Write a file into the bank's directory atomically, unless the bank was deleted."""
        with entry.lock:
            self._alive(entry)
            assert entry.bank.path is not None
            atomic_write(entry.bank.path / name, data)

    def _queue(self, entry: Entry, spec: str, train_size: int | None) -> IndexState:
        state = IndexState(spec, train_size=train_size)
        entry.build = state
        self._builder.submit(self._run, entry, state)
        return state

    def _run(self, entry: Entry, state: IndexState) -> None:
        if entry.build is state:  # else superseded by a newer request while queued
            self._build(entry, state)

    def _build(self, entry: Entry, state: IndexState) -> None:
        t0 = time.perf_counter()
        assert entry.bank.path is not None
        marker = entry.bank.path / BUILDING_FILE
        try:
            with entry.lock:  # a consistent snapshot: no write lands between the reads
                if entry.build is not state or entry.dead:
                    return
                vectors, ids, version = entry.bank.vectors(), entry.bank.ids(), entry.version
                state.state, state.progress = Phase.TRAINING, 0.1
                marker.parent.mkdir(exist_ok=True)
                marker.write_text(json.dumps({"spec": state.spec}))
            kw = {} if state.train_size is None else {"train_size": state.train_size}
            index = ApproxIndex.build(vectors, ids, entry.bank.metric, state.spec, **kw)
            del vectors
            state.state, state.progress = Phase.SAVING, 0.9
            state.build_seconds = round(time.perf_counter() - t0, 3)
            index.meta = {
                "bank_version": version,
                "build_seconds": state.build_seconds,
                "train_size": state.train_size,
            }
            with entry.lock:  # writes into the bank's directory: only while it is alive
                if entry.build is not state or entry.dead:
                    return  # superseded by a write or a newer request, or deleted
                index.save(entry.bank.path / INDEX_FILE)
                state.bank_version, state.progress = version, 1.0
                entry.working = state
                if entry.version == version:
                    entry.index, state.state = index, Phase.READY
                else:  # a write landed and did not queue a rebuild (auto-rebuild off)
                    state.state = Phase.STALE
        except (VQSearchError, StorageError, OSError, RuntimeError, MemoryError) as exc:
            log.error("index build for %s failed: %s", entry.name, exc)
            with entry.lock:
                self._failed(entry, state, exc)
        finally:  # the process lived through this build (one build runs at a time)
            with entry.lock:
                if not entry.dead:
                    marker.unlink(missing_ok=True)

    def _failed(self, entry: Entry, state: IndexState, exc: Exception) -> None:
        """Under entry.lock: a failed build keeps the working index and its spec (and says
        why the new one failed); with none, the failed spec is reported as failed."""
        state.state, state.error = Phase.FAILED, str(exc)
        if entry.build is not state or entry.working is None:
            return
        kept = Phase.READY if entry.index is not None else Phase.STALE
        entry.build = replace(
            entry.working,
            state=kept,
            error=f"the build of {state.spec!r} failed ({exc}); {entry.working.spec!r} kept",
        )


def _read_building(path: Path) -> str | None:
    """The spec of a build that a dead process left unfinished, or None."""
    try:
        return str(json.loads(path.read_bytes()).get("spec", "?"))
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError, OSError):
        return "?"
