"""Background jobs of a registry, on threads of their own: index builds (and the sweeps
queued behind them) on one, compactions on another. What a build reads and writes, and how
writes supersede it, is described in `Jobs.stale`."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from vqsearch.index import (
    ApproxIndex,
    StorageError,
    VQSearchError,
    default_spec,
)

from ._entry import (
    BUILDING_FILE,
    INDEX_FILE,
    RUNNING,
    Entry,
    IndexState,
    Phase,
    ReadOnlyError,
    check_alive,
)

log = logging.getLogger("vqsearch")


class Jobs:
    """Owns the build and compaction threads of one registry."""

    def __init__(
        self, auto_rebuild: bool, read_only: bool, index_budget: int | None = None
    ) -> None:
        self.auto_rebuild, self.read_only = auto_rebuild, read_only
        self.index_budget = index_budget  # bytes a default spec's index may hold
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="vqsearch-build")
        # compactions stream the bank after the write that piled up its segments was answered
        self._compactor = ThreadPoolExecutor(1, thread_name_prefix="vqsearch-compact")

    def drain_compactions(self) -> None:
        """Wait for the compactions queued so far (tests, shutdown)."""
        self._compactor.submit(lambda: None).result()

    def close(self) -> None:
        self._compactor.shutdown(wait=True, cancel_futures=True)
        self._builder.shutdown(wait=True, cancel_futures=True)

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("this server is a read-only replica; send writes to the primary")

    def load_index(self, entry: Entry) -> None:
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

    def stale(self, entry: Entry) -> None:
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
            check_alive(entry)
            return self._queue(entry, spec or self.default_spec(entry), train_size)

    def default_spec(self, entry: Entry) -> str:
        return default_spec(entry.index_rows, entry.bank.d, self.index_budget)

    def build_now(self, entry: Entry) -> IndexState:
        """Build the default index on the calling thread (the builder's own: sweeps)."""
        with entry.lock:
            state = entry.build = IndexState(self.default_spec(entry))
        self._build(entry, state)
        return state

    def background(self, fn: Any, *args: Any) -> Future[Any]:
        """Run a write job (a sweep) on the build thread, after the builds queued before it."""
        self._writable()
        return self._builder.submit(fn, *args)

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
                # the rows as they are now, read block by block from their files by the build
                snapshot, version = entry.bank.snapshot(), entry.version
                state.state, state.progress = Phase.TRAINING, 0.1
                marker.parent.mkdir(exist_ok=True)
                marker.write_text(json.dumps({"spec": state.spec}))
            train = state.rows_to_train
            index = ApproxIndex.build(snapshot, spec=state.spec, train_size=train)
            del snapshot
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
                    if entry.placed is not None:  # the shards build theirs meanwhile
                        entry.placed.prepare_index(state.spec, train, entry.bank.version)
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

    def compact_later(self, entry: Entry) -> None:
        """Under entry.lock: queue a compaction if the bank needs one and none is queued."""
        if entry.bank.needs_compaction and not entry.compacting:
            entry.compacting = True
            self._compactor.submit(self.compact, entry)

    def compact(self, entry: Entry) -> None:
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
                self.compact_later(entry)  # writes since the snapshot may need another
        except (StorageError, OSError) as exc:
            entry.compacting = False
            log.error("compaction of %s failed (the bank is unchanged): %s", entry.name, exc)


def _read_building(path: Path) -> str | None:
    """The spec of a build that a dead process left unfinished, or None."""
    try:
        return str(json.loads(path.read_bytes()).get("spec", "?"))
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError, OSError):
        return "?"
