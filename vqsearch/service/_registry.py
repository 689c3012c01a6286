"""Banks on disk: one directory per bank under `<data_dir>/banks/`, each with its approximate
index in `index/`. Creation builds the bank in a temporary directory and renames it into place;
deletion renames it into `trash/` first: a crash leaves a bank whole or absent.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from vqsearch.index import Bank, MetricName, VQSearchError, atomic_write

from ._entry import (
    TRADEOFF_FILE,
    BankExistsError,
    Entry,
    IndexState,
    LimitError,
    Limits,
    ReadOnlyError,
    SweepPhase,
    UnknownBankError,
    check_alive,
    stamp_of,
)
from ._jobs import Jobs
from ._lock import DataDirLock
from ._sampling import Reservoir, Usage
from ._shards import Placement, read_shards, write_shards

log = logging.getLogger("vqsearch")


class Registry:
    """All banks of a data directory, loaded at start; their index builds and compactions run
    as `jobs` (`_jobs`)."""

    def __init__(
        self,
        root: Path,
        auto_rebuild: bool = True,
        read_only: bool = False,
        reservoir: int = 0,
        usage_window: int = 0,
        limits: Limits | None = None,
        placement: Placement | None = None,
        index_budget: int | None = None,
    ) -> None:
        self.root, self.limits = Path(root), limits or Limits()
        self.reservoir_size, self.usage_window = reservoir, usage_window
        self.read_only = read_only
        self.placement = placement  # where sharded banks' shards run; None: no cluster
        self.banks_dir, self.trash = self.root / "banks", self.root / "trash"
        self.entries: dict[str, Entry] = {}
        self.loaded = False
        self._lock = threading.Lock()
        # a replica whose writes go to a writer elsewhere (`_forward`) reads a bank's files
        # again before each request when they changed: what the writer acknowledged is served
        self.follow_writes = False
        self._follow_lock = threading.RLock()
        self.jobs = Jobs(auto_rebuild, read_only, index_budget)
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

    def _open(
        self, p: Path, old: Entry | None = None, stamp: tuple[int, ...] | None = None
    ) -> Entry:
        """The bank in `p`, opened. stamp: its files' marks, taken before it is read (read
        here when not given); old: the entry it replaces, whose unchanged files are kept."""
        stamp = stamp_of(p) if stamp is None else stamp
        bank = Bank.open(p, writable=not self.read_only, auto_compact=False)
        entry = Entry(p.name, bank, shards=read_shards(p), stamp=stamp)
        self._place(entry)
        if old is not None and old.stamp[1:] == stamp[1:]:
            # the index and the sweep are the files they were: kept, not read again (an
            # index is large), and the index serves only while it matches the bank
            entry.working, entry.build, entry.tradeoff = old.working, old.build, old.tradeoff
            entry.sweep = old.sweep
            if old.index is not None and old.build and old.build.bank_version == entry.version:
                entry.index = old.index
        else:
            self.jobs.load_index(entry)
            self._load_tradeoff(entry)
        self._attach(entry)
        return entry

    def refresh(self) -> None:
        """For read-only replicas: take up what the primary wrote since the last look (new,
        changed and deleted banks, rebuilt indexes, new sweeps). A bank caught mid-change is
        kept as it was and looked at again next time."""
        seen = set()
        for p in sorted(self.banks_dir.iterdir()) if self.banks_dir.exists() else []:
            if not p.name.startswith("."):
                seen.add(p.name)
                self._take_up(p)
        for name in set(self.entries) - seen:
            del self.entries[name]

    def _take_up(self, p: Path) -> None:
        """The bank in `p` as its files are now, if they changed: opened again (absent: gone).
        A bank caught mid-change is kept as it was."""
        with self._follow_lock:
            old = self.entries.get(p.name)
            try:
                stamp = stamp_of(p)
                if stamp[0] == 0:  # no manifest: deleted (or not yet whole)
                    if old is not None and not p.exists():
                        del self.entries[p.name]
                    return
                if old is not None and old.stamp == stamp:
                    return
                new = self._open(p, old, stamp)
            except (VQSearchError, OSError) as exc:
                log.warning("bank %s not refreshed: %s", p.name, exc)
                return
            if old is not None:
                new.usage, new.reservoir = old.usage, old.reservoir
            self.entries[p.name] = new

    def _place(self, entry: Entry) -> None:
        """Start a sharded bank's shards on the cluster (a server without one searches the
        bank whole: the same answers)."""
        if self.placement is not None and entry.shards > 1 and not self.read_only:
            assert entry.bank.path is not None
            entry.placed = self.placement(entry.bank.path, entry.shards, entry.bank.metric)

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
        self.jobs.close()
        for entry in self.entries.values():
            if entry.placed is not None:
                entry.placed.close()
        self._dir_lock.release()

    def list(self) -> list[Entry]:
        """Every bank, by name (the same order across restarts)."""
        if self.follow_writes:
            self.refresh()
        return sorted(self.entries.values(), key=lambda e: e.name)

    def get(self, name: str) -> Entry:
        if self.follow_writes:
            self._take_up(self.banks_dir / name)
        try:
            return self.entries[name]
        except KeyError:
            raise UnknownBankError(f"no bank named {name!r}") from None

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("this server is a read-only replica; send writes to the primary")

    def create(
        self, name: str, d: int, metric: MetricName, vectors: Any, ids: Any, shards: int = 1
    ) -> Entry:
        self._writable()
        if shards > 1 and self.placement is None:
            raise LimitError(
                f"shards={shards} needs a Ray cluster: start the server with VQSEARCH_RAY_ADDRESS"
            )
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
                if shards > 1:
                    write_shards(tmp, shards)
                tmp.rename(self.banks_dir / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            bank = Bank.open(self.banks_dir / name, verify=False, auto_compact=False)
            entry = Entry(name, bank, shards=shards)
            try:
                self._place(entry)
            except BaseException:
                # not acknowledged: the bank goes, so that the name is free to retry with
                self._to_trash(self.banks_dir / name, name)
                shutil.rmtree(self.trash, ignore_errors=True)
                raise
            self._attach(entry)
            self.entries[name] = entry
            return entry

    def _to_trash(self, path: Path, name: str) -> None:
        """One rename takes a bank's directory out of banks/: a crash leaves it whole or gone."""
        self.trash.mkdir(exist_ok=True)
        path.rename(self.trash / f"{name}.{uuid.uuid4().hex}")

    def delete(self, name: str) -> None:
        """Under the entry's lock: no write of the bank is under way, and every later one
        (from a request that got the entry before) finds it dead and lands nowhere, not in a
        new bank of the same name."""
        self._writable()
        with self._lock:
            entry = self.get(name)
            with entry.lock:
                assert entry.bank.path is not None
                self._to_trash(entry.bank.path, name)
                entry.dead, entry.index = True, None
                del self.entries[name]
                if entry.placed is not None:
                    entry.placed.close()
        shutil.rmtree(self.trash, ignore_errors=True)

    def add(self, entry: Entry, vectors: Any, ids: Any) -> np.ndarray:
        self._writable()
        with entry.lock:
            check_alive(entry)
            total, top = entry.bank.ntotal + len(vectors), self.limits.max_bank_vectors
            if total > top:
                raise LimitError(f"{total} vectors would exceed VQSEARCH_MAX_BANK_VECTORS={top}")
            generation = entry.bank.generation
            added = entry.bank.add(vectors, ids)
            if entry.bank.generation != generation:
                self.jobs.stale(entry)
                self.jobs.compact_later(entry)
            return added

    def remove(self, entry: Entry, ids: Any) -> int:
        self._writable()
        with entry.lock:
            check_alive(entry)
            generation = entry.bank.generation
            n = entry.bank.remove(ids)
            if entry.bank.generation != generation:
                self.jobs.stale(entry)
                self.jobs.compact_later(entry)
            return n

    def build_index(
        self, entry: Entry, spec: str | None, train_size: int | None = None
    ) -> IndexState:
        """Queue a build of `spec` (default: from the bank's size and width); the current
        index (if any) serves until the new one is ready."""
        self._writable()
        return self.jobs.build_index(entry, spec, train_size)

    def default_spec(self, entry: Entry) -> str:
        """What a build without a spec builds: from the bank's size and width, its codes
        within the index memory budget."""
        return self.jobs.default_spec(entry)

    def build_now(self, entry: Entry) -> IndexState:
        """Build the default index on the calling thread (the build thread's own: sweeps)."""
        return self.jobs.build_now(entry)

    def background(self, fn: Any, *args: Any) -> Future[Any]:
        """Run a write job (a sweep) on the build thread, after the builds queued before it."""
        self._writable()
        return self.jobs.background(fn, *args)

    def write_file(self, entry: Entry, name: str, data: bytes) -> None:
        """Write a file into the bank's directory atomically, unless the bank was deleted."""
        with entry.lock:
            check_alive(entry)
            assert entry.bank.path is not None
            atomic_write(entry.bank.path / name, data)
