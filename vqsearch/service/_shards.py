"""Sharded banks, as the service sees them: a bank's rows split over shards that a cluster
runs (`vqsearch.ray`), each answering for its part; the service merges their answers.

The bank's directory stays the source of truth and this server its one writer: shards load
their rows from it, at the version a request names (`ShardSet.search`), so an acknowledged
write is in every answer that follows it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from vqsearch.index import CorruptBankError, Queries, atomic_write

SHARDS_FILE = "shards.json"  # {"shards": N} in a bank's directory; absent: one
RETRY_AFTER_S = 2  # how long a shard's restart is expected to take, as a 503 says


class ShardsUnavailableError(Exception):
    """A shard cannot answer (its node died and it is restarting, or it timed out): the
    request gets 503 with Retry-After, never a partial answer."""


class ShardSet(Protocol):
    """The shards of one bank, placed on a cluster."""

    n: int

    def search(
        self, xq: Queries, k: int, version: Callable[[], str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over all shards, at the bank's version (`version()`: this server's
        view, read before and after they answer): D (nq, k) as reported, I (nq, k)."""
        ...

    def search_approx(
        self,
        xq: Queries,
        k: int,
        spec: str,
        train_size: int,
        nprobe: int | None,
        k_factor: float,
        version: Callable[[], str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k: each shard's own index of `spec` proposes, each shard's rows
        re-rank exactly, merged as exact answers are, at the bank's version."""
        ...

    def prepare_index(self, spec: str, train_size: int, version: str) -> None:
        """Have every shard build its index of `spec` at `version`, not waiting for it."""
        ...

    def close(self) -> None: ...


Placement = Callable[[Path, int, str], ShardSet]  # (bank directory, shards, metric) -> placed


def write_shards(path: Path, n: int) -> None:
    atomic_write(path / SHARDS_FILE, json.dumps({"shards": n}).encode())


def read_shards(path: Path) -> int:
    try:
        n = json.loads((path / SHARDS_FILE).read_bytes())["shards"]
    except FileNotFoundError:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise CorruptBankError(
            f"{path / SHARDS_FILE}: shards must be a positive integer, not {n!r}"
        )
    return n
