"""Tradeoff sweeps for a bank, run on the registry's background worker, and `mode=auto`."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vqsearch.index import (
    ApproxIndex,
    Queries,
    VQSearchError,
    perturbed_queries,
    pick,
    sweep,
)

from ._entry import TRADEOFF_FILE, Entry, SweepPhase, UnknownBankError
from ._registry import Registry
from ._setting import EXACT, Setting

log = logging.getLogger("vqsearch")
MIN_RESERVOIR = 100  # fewer recorded queries than this are too few to measure recall on


def eval_queries(entry: Entry, queries: np.ndarray | None, n: int) -> tuple[np.ndarray, str]:
    """The user's queries, else the bank's recorded real queries, else perturbed bank vectors."""
    if queries is not None:
        return queries, "user"
    if entry.reservoir is not None:
        sample = entry.reservoir.sample()
        if len(sample) >= MIN_RESERVOIR:
            return sample, "reservoir"
    return perturbed_queries(entry.bank.snapshot(), n, entry.bank.metric), "perturbed"


@dataclass(frozen=True)
class OnShards:
    """A sharded bank's answers as `mode=exact` and `mode=approx` serve them: through its
    shards (`ShardSet`), each with its own index of the spec."""

    entry: Entry

    def _queries(self, xq: np.ndarray) -> Queries:
        return Queries.of(xq, self.entry.bank.d, self.entry.bank.metric)

    def exact(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        placed = self.entry.placed
        assert placed is not None
        return placed.search(self._queries(xq), k, lambda: self.entry.bank.version)

    def approx(
        self, index: ApproxIndex, xq: np.ndarray, k: int, nprobe: int | None, k_factor: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.entry.approx_on_shards(self._queries(xq), k, index, nprobe, k_factor)


def start(registry: Registry, entry: Entry, **kw: Any) -> dict[str, Any]:
    job: dict[str, Any] = {"state": SweepPhase.QUEUED, "progress": 0.0}
    before, entry.sweep = entry.sweep, job  # before it can start: `_run` checks it is current
    try:
        registry.background(_run, registry, entry, job, kw)
    except Exception:
        entry.sweep = before
        raise
    return job


def _run(registry: Registry, entry: Entry, job: dict[str, Any], kw: dict[str, Any]) -> None:
    if entry.sweep is not job:
        return
    try:
        if entry.index is None:  # the bank's own index comes first: build the default spec
            job["state"] = SweepPhase.BUILDING
            state = registry.build_now(entry)
            if entry.index is None:
                raise RuntimeError(
                    f"could not build the bank's index: {state.error or state.state}"
                )
        with entry.lock:  # the rows as they are now, read where they lie by the sweep
            bank, version, own = entry.bank.snapshot(), entry.version, entry.index
        xq, source = eval_queries(entry, kw.get("queries"), kw.get("n_queries", 1000))
        job["state"] = SweepPhase.MEASURING

        def progress(f: float) -> None:
            job["progress"] = round(f, 3)

        on_shards = None if entry.placed is None else OnShards(entry)
        report = sweep(
            bank,
            None,
            entry.bank.metric,
            xq,
            indexes=[own],
            served=on_shards,
            specs=kw.get("specs", ()),
            batch_sizes=kw.get("batch_sizes", (1, 64, 4096)),
            min_seconds=kw.get("min_seconds", 0.2),
            progress=progress,
            device=kw.get("device", "cpu"),
        )
        report |= {
            "served_by": "server" if entry.placed is None else f"{entry.shards} shards",
            "query_source": source,
            "bank_version": version,
            "index_spec": own.spec,
            "bank": entry.name,
        }
        registry.write_file(entry, TRADEOFF_FILE, json.dumps(report).encode())
    except (VQSearchError, UnknownBankError, RuntimeError, ValueError, OSError, MemoryError) as exc:
        job |= {"state": SweepPhase.FAILED, "error": str(exc)}
        log.error("tradeoff sweep for %s failed: %s", entry.name, exc)
        return
    entry.tradeoff = report
    job |= {"state": SweepPhase.DONE, "progress": 1.0}


def auto_setting(entry: Entry, target: float, measure: str, nq: int) -> Setting:
    """The fastest measured setting of the bank's own index reaching `target`, timed at the
    measured batch size nearest (in log scale) to this request's nq; exact when none reached
    it, when no sweep was measured on the bank as it is now, or when no index is ready."""
    report, index = entry.tradeoff, entry.index
    if report is None or index is None or report.get("bank_version") != entry.version:
        return Setting(reason="no sweep measured on this bank version")
    sizes = [int(b) for b in report["points"][0]["qps"]]
    batch = min(sizes, key=lambda b: abs(math.log(b) - math.log(max(nq, 1))))
    point = pick(report, target, measure, spec=index.spec, batch=batch)
    if point["spec"] == EXACT:
        return Setting(reason=f"no setting of {index.spec} reached {measure} >= {target}")
    k_factor = point.get("k_factor")
    return Setting(
        point["spec"],
        point.get("nprobe"),
        None if k_factor is None else float(k_factor),
        measured_recall=point[measure],
    )
