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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vqsearch.index import ApproxIndex, Bank, StorageError, VQSearchError
from vqsearch.index._validate import Metric

from ._sampling import Reservoir, Usage

log = logging.getLogger("vqsearch")
INDEX_FILE = "index/index.faiss"
TRADEOFF_FILE = "tradeoff.json"


class BankExistsError(Exception):
    pass


class UnknownBankError(Exception):
    pass


class ReadOnlyError(Exception):
    pass


class LimitError(Exception):
    """A configured limit (named in the message) would be exceeded."""


@dataclass(frozen=True)
class Limits:
    max_d: int = 65536
    max_bank_vectors: int = 100_000_000
    max_banks: int = 1000


@dataclass
class IndexState:
    """The bank's approximate index as the API reports it."""

    spec: str
    state: str = "queued"  # queued | training | adding | saving | ready | stale | failed
    progress: float = 0.0
    error: str | None = None
    bank_version: str | None = None
    build_seconds: float | None = None

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
    build: IndexState | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    reservoir: Reservoir | None = None
    usage: Usage | None = None
    stamp: tuple[int, ...] = ()  # what the files looked like when loaded (replicas compare)
    tradeoff: dict[str, Any] | None = None  # the last sweep's report
    sweep: dict[str, Any] = field(default_factory=lambda: {"state": "none", "progress": 0.0})

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

    def load(self) -> None:
        if not self.read_only:
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
        entry = Entry(p.name, Bank.open(p, writable=not self.read_only), stamp=_stamp(p))
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
        path = entry.bank.path / INDEX_FILE  # type: ignore[operator]
        if not path.exists():
            return
        try:
            index = ApproxIndex.load(path)
        except VQSearchError as exc:
            log.error("index of %s not loaded: %s", entry.name, exc)
            return
        entry.build = IndexState(
            index.spec,
            "ready",
            1.0,
            bank_version=index.meta.get("bank_version"),
            build_seconds=index.meta.get("build_seconds"),
        )
        if entry.build.bank_version == entry.version:
            entry.index = index
        else:
            self._stale(entry)

    def _attach(self, entry: Entry) -> None:
        if self.reservoir_size > 0:
            entry.reservoir = Reservoir(self.reservoir_size, entry.bank.d)
        if self.usage_window > 0:
            entry.usage = Usage(self.usage_window)

    def _load_tradeoff(self, entry: Entry) -> None:
        path = entry.bank.path / TRADEOFF_FILE  # type: ignore[operator]
        try:
            entry.tradeoff = json.loads(path.read_bytes())
            entry.sweep = {"state": "done", "progress": 1.0}
        except FileNotFoundError:
            pass
        except ValueError as exc:
            log.error("tradeoff report of %s not loaded: %s", entry.name, exc)

    def close(self) -> None:
        self._builder.shutdown(wait=True, cancel_futures=True)

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
            entry = Entry(name, Bank.open(self.banks_dir / name, verify=False))
            self._attach(entry)
            self.entries[name] = entry
            return entry

    def delete(self, name: str) -> None:
        self._writable()
        with self._lock:
            entry = self.get(name)
            self.trash.mkdir(exist_ok=True)
            assert entry.bank.path is not None
            entry.bank.path.rename(self.trash / f"{name}.{uuid.uuid4().hex}")
            del self.entries[name]
        shutil.rmtree(self.trash, ignore_errors=True)

    # -- writes and the index they make stale ---------------------------------------------------

    def add(self, entry: Entry, vectors: Any, ids: Any) -> np.ndarray:
        self._writable()
        with entry.lock:
            total, top = entry.bank.ntotal + len(vectors), self.limits.max_bank_vectors
            if total > top:
                raise LimitError(f"{total} vectors would exceed VQSEARCH_MAX_BANK_VECTORS={top}")
            added = entry.bank.add(vectors, ids)
            self._stale(entry)
            return added

    def remove(self, entry: Entry, ids: Any) -> int:
        self._writable()
        with entry.lock:
            n = entry.bank.remove(ids)
            self._stale(entry)
            return n

    def _stale(self, entry: Entry) -> None:
        """The index no longer holds the bank's content: stop serving it; maybe rebuild."""
        entry.index = None
        if entry.build is not None and entry.build.state in ("ready", "failed", "stale"):
            entry.build.state = "stale"
            if self.auto_rebuild:
                self.build_index(entry, entry.build.spec)

    def build_index(self, entry: Entry, spec: str | None, **kw: Any) -> IndexState:
        """Queue a build; the current index (if any) serves until the new one is ready."""
        self._writable()
        state = IndexState(spec or "")
        entry.build = state
        self._builder.submit(self._build, entry, state, spec, kw)
        return state

    def _build(self, entry: Entry, state: IndexState, spec: str | None, kw: dict[str, Any]) -> None:
        if entry.build is not state:
            return  # superseded by a newer request while queued
        t0 = time.perf_counter()
        try:
            with entry.lock:  # a consistent snapshot: no write can land between the two reads
                vectors, ids, version = entry.bank.vectors(), entry.bank.ids(), entry.version
            state.state, state.progress = "training", 0.1
            index = ApproxIndex.build(vectors, ids, entry.bank.metric, spec, **kw)
            state.spec, state.state, state.progress = index.spec, "saving", 0.9
            state.build_seconds = round(time.perf_counter() - t0, 3)
            index.meta = {"bank_version": version, "build_seconds": state.build_seconds}
            assert entry.bank.path is not None
            (entry.bank.path / "index").mkdir(exist_ok=True)
            index.save(entry.bank.path / INDEX_FILE)
        except (VQSearchError, StorageError, OSError, RuntimeError, MemoryError) as exc:
            state.state, state.error = "failed", str(exc)
            log.error("index build for %s failed: %s", entry.name, exc)
            return
        with entry.lock:
            if entry.build is not state:
                return
            state.bank_version, state.progress = version, 1.0
            if entry.version == version:
                entry.index, state.state = index, "ready"
            else:
                self._stale(entry)
