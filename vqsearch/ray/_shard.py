"""One shard of a bank, the body of a Ray actor (and a plain object without Ray)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vqsearch.index import ApproxIndex, Bank, VQSearchError, search_proposed64

RELOADS = 5  # reads of the directory a shard tries (a reload then answers from what it holds)


class BankShard:
    """Shard `s` of `n` of the bank in `path`: its live rows with id % n == s (`Bank.shard`),
    read from the directory at the version a request names. The server is the directory's
    one writer and replaces the manifest last, so the version it acknowledged is on disk."""

    def __init__(self, path: str, s: int, n: int) -> None:
        self.path, self.s, self.n = Path(path), s, n
        # Its rows, copied out of the bank's segments (a shard's rows are every n-th of
        # them), live in files of its own on this node's disk, memory-mapped: the page cache
        # holds them, evictable, not the actor. A restarted shard starts the directory afresh.
        tag = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        self.spill = Path(tempfile.gettempdir()) / "vqsearch-shards" / f"{tag}-{s}-{n}"
        shutil.rmtree(self.spill, ignore_errors=True)
        self.spill.mkdir(parents=True)
        # An exception here would end the actor for good (Ray restarts crashed actors only),
        # as when the bank was deleted before the actor started: it leaves no copies behind.
        try:
            self.bank = self._read(verify=True)
        except BaseException:
            self.close()
            raise
        self.index: ApproxIndex | None = None  # this shard's own, over its rows
        self.built: tuple[str, int, str] | None = None  # (spec, train_size, version) of it

    def _load(self, verify: bool = False, reuse: Bank | None = None) -> Bank:
        # A (re)started shard checks every file against its manifest's checksum; reloads after
        # a write do not hash the whole bank again: the writer hashed each file as it wrote
        # it, and names it in a manifest only once it is whole on disk.
        bank = Bank.open(self.path, verify=verify, writable=False, auto_compact=False)
        mine = bank.shard(self.s, self.n, reuse=reuse, spill=self.spill)
        used = mine.mapped_files()
        for f in self.spill.iterdir():  # the copies of segments a compaction replaced
            if f not in used:
                f.unlink(missing_ok=True)
        return mine

    def _read(self, verify: bool = False, reuse: Bank | None = None) -> Bank:
        """`_load`, tried again when a read meets a file the manifest named but a compaction
        of the server (which goes on writing) removed; the last failure is raised."""
        for attempt in range(RELOADS - 1):
            try:
                return self._load(verify, reuse)
            except (VQSearchError, OSError):
                time.sleep(0.05 * (attempt + 1))
        return self._load(verify, reuse)

    def _reload(self) -> None:
        # One read that succeeds is the directory as it is: the server acknowledges a version
        # only once its manifest is on disk, so reading again cannot reach an older one; the
        # caller compares versions (`RayShards.search`). Failing, the shard answers from what
        # it holds, and the caller sees its older version.
        with contextlib.suppress(VQSearchError, OSError):
            self.bank = self._read(reuse=self.bank)

    def search64(self, xq: Any, k: int, version: str) -> tuple[np.ndarray, np.ndarray, str]:
        """`Bank.search64` of this shard at `version` (read again when it has moved on) ->
        D (nq, k') float64, I (nq, k'), and the version that answered (the caller checks)."""
        if self.bank.version != version:
            self._reload()
        D, I = self.bank.search64(xq, k)
        return D, I, self.bank.version

    def build_index(self, spec: str, train_size: int, version: str) -> str:
        """This shard's index of `spec` over its rows at `version` (kept until either
        changes; a restarted shard builds it again at its first approximate search)."""
        if self.bank.version != version:
            self._reload()
        key = (spec, train_size, self.bank.version)
        if self.built != key:
            self.index = None
            if self.bank.ntotal:
                self.index = ApproxIndex.build(self.bank, spec=spec, train_size=train_size)
            self.built = key
        return self.bank.version

    def search_approx(
        self,
        xq: Any,
        k: int,
        spec: str,
        train_size: int,
        nprobe: int | None,
        k_factor: float,
        version: str,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Approximate top-k of this shard at `version`: its own index of `spec` proposes,
        its rows re-rank (`search_proposed64`) -> D (nq, k') float64 exact distances, 'smaller
        is nearer', I (nq, k'), k' = min(k, its rows), and the version that answered."""
        answered = self.build_index(spec, train_size, version)
        if self.index is None:
            nq = len(xq)
            return np.empty((nq, 0), np.float64), np.empty((nq, 0), np.int64), answered
        kk = min(k, self.index.ntotal)
        D, I = search_proposed64(self.bank, self.index, xq, kk, k_factor, nprobe)
        return D, I, answered

    def close(self) -> None:
        """Remove this shard's copies (the bank is closed, or deleted)."""
        shutil.rmtree(self.spill, ignore_errors=True)

    def ids(self) -> np.ndarray:
        """The ids this shard holds, as loaded (the version it answered last)."""
        return self.bank.ids()

    def where(self) -> tuple[str, int]:
        """(Ray node id, process id) this shard runs in."""
        import ray  # here: the class is usable without Ray

        return ray.get_runtime_context().get_node_id(), os.getpid()
