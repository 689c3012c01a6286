"""One shard of a bank, the body of a Ray actor (and a plain object without Ray)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from vqsearch.index import Bank, VQSearchError

RELOADS = 5  # failed reads of the directory before a shard answers from what it holds


class BankShard:
    """Shard `s` of `n` of the bank in `path`: its live rows with id % n == s (`Bank.shard`),
    read from the directory at the version a request names. The server is the directory's
    one writer and replaces the manifest last, so the version it acknowledged is on disk."""

    def __init__(self, path: str, s: int, n: int) -> None:
        self.path, self.s, self.n = Path(path), s, n
        self.bank = self._load(verify=True)

    def _load(self, verify: bool = False, reuse: Bank | None = None) -> Bank:
        # A (re)started shard checks every file against its manifest's checksum; reloads after
        # a write do not hash the whole bank again: the writer hashed each file as it wrote
        # it, and names it in a manifest only once it is whole on disk.
        bank = Bank.open(self.path, verify=verify, writable=False, auto_compact=False)
        return bank.shard(self.s, self.n, reuse=reuse)

    def _reload(self) -> None:
        # One read that succeeds is the directory as it is: the server acknowledges a version
        # only once its manifest is on disk, so reading again cannot reach an older one; the
        # caller compares versions (`RayShards.search`).
        for attempt in range(RELOADS):
            try:
                self.bank = self._load(reuse=self.bank)
                return
            except (VQSearchError, OSError):  # a compaction removed a file the manifest named
                time.sleep(0.05 * (attempt + 1))

    def search64(self, xq: Any, k: int, version: str) -> tuple[np.ndarray, np.ndarray, str]:
        """`Bank.search64` of this shard at `version` (read again when it has moved on) ->
        D (nq, k') float64, I (nq, k'), and the version that answered (the caller checks)."""
        if self.bank.version != version:
            self._reload()
        D, I = self.bank.search64(xq, k)
        return D, I, self.bank.version

    def ids(self) -> np.ndarray:
        """The ids this shard holds, as loaded (the version it answered last)."""
        return self.bank.ids()

    def where(self) -> tuple[str, int]:
        """(Ray node id, process id) this shard runs in."""
        import ray  # here: the class is usable without Ray

        return ray.get_runtime_context().get_node_id(), os.getpid()
