"""A bank as the service holds it (`Entry`), the state of its approximate index, and the
errors of the bank registry."""

from __future__ import annotations

import contextlib
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vqsearch._wire_names import IndexPhase, SweepPhase
from vqsearch.index import TRAIN_SIZE, ApproxIndex, Bank, Queries

from ._sampling import Reservoir, Usage
from ._shards import ShardSet

INDEX_FILE = "index/index.faiss"
BUILDING_FILE = "index/building.json"  # present while a build runs: a crash leaves it behind
TRADEOFF_FILE = "tradeoff.json"


Phase = IndexPhase  # the index states, as the client reads them (`vqsearch._wire_names`)
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

    @property
    def rows_to_train(self) -> int:
        """The training sample's size: as asked, else the engine's default."""
        return TRAIN_SIZE if self.train_size is None else self.train_size

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
                "bytes": index.nbytes,  # what it holds in RAM: codes, ids, centroids
                "bytes_per_vector": round(index.nbytes / max(index.ntotal, 1), 2),
                # who scores the shortlist: faiss's own float32 copy, or the bank's rows
                "rerank": "index" if index.has_refine else "bank",
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
    shards: int = 1  # as the bank was made (`shards.json`)
    placed: ShardSet | None = None  # its shards on a cluster; None: searched here, whole
    stamp: tuple[int, ...] = ()  # what the files looked like when loaded (replicas compare)
    tradeoff: dict[str, Any] | None = None  # the last sweep's report
    sweep: dict[str, Any] = field(
        default_factory=lambda: {"state": SweepPhase.NONE, "progress": 0.0}
    )

    @property
    def index_rows(self) -> int:
        """The rows an approximate index is built on: the bank's, or on a cluster, where each
        shard builds its own, the smallest shard's (what a spec must be able to train on)."""
        b = self.bank
        if self.placed is None or b.ntotal == 0:
            return b.ntotal
        return int(np.bincount(b.ids() % self.shards, minlength=self.shards).min())

    def approx_on_shards(
        self,
        xq: Queries,
        k: int,
        index: ApproxIndex,
        nprobe: int | None,
        k_factor: float | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`mode=approx` of a bank on a cluster: each shard's own index of the spec of
        `index` (the one that serves here), trained as it was, at the bank's version."""
        assert self.placed is not None
        train = self.working.rows_to_train if self.working else TRAIN_SIZE
        kf = index.k_factor if k_factor is None else k_factor
        return self.placed.search_approx(
            xq, k, index.spec, train, nprobe, kf, lambda: self.bank.version
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
            "bytes_on_disk": disk_bytes(b.path),
            "version": self.version,
            "generation": b.generation,
            "segments": b.num_segments,
            "shards": self.shards,
            "max_id": int(b.ids().max()) if b.ntotal else None,
            "index": None if self.build is None else self.build.info(self.index),
            "tradeoff": self.sweep | {"measured": self.tradeoff is not None},
            "query_sample": None if self.reservoir is None else len(self.reservoir.sample()),
            "usage": None if self.usage is None else self.usage.summary(b.ids()),
        }


def disk_bytes(p: Path | None) -> int:
    """Bytes of the files in a bank's directory: segments, tombstones, index, reports."""
    if p is None:
        return 0
    total = 0
    for f in p.rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # a file a write just replaced
            if f.is_file():
                total += f.stat().st_size
    return total


def stamp_of(p: Path) -> tuple[int, ...]:
    """Change marks of a bank directory: a checksum of its manifest (0: none; two writes
    within one tick of the file clock leave the same mtime, never the same manifest, whose
    generation counts every write), and the index sidecar's and sweep report's mtimes."""
    try:
        manifest = zlib.crc32((p / "manifest.json").read_bytes()) + 1
    except FileNotFoundError:
        manifest = 0
    files = (p / (INDEX_FILE + ".json"), p / TRADEOFF_FILE)
    return (manifest, *(f.stat().st_mtime_ns if f.exists() else 0 for f in files))


def check_alive(entry: Entry) -> None:
    """Call under entry.lock before writing to the bank's directory."""
    if entry.dead:
        raise DeletedBankError(f"bank {entry.name!r} was deleted while this request ran")
