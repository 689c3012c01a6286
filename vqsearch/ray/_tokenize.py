"""`vqsearch tokenize --ray`: the files of a `Plan` as a Ray Dataset, one file per batch, coded
by a pool of actors that each open the bank once (from the data dir every node sees) and
write their outputs themselves; this process records them in the manifest as they finish."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray

from vqsearch._tokenize import BankCoder, Outcome, Plan, run_local

from ._cluster import Cluster


class _Tokenizer:
    """One actor of the pool: the bank, opened once, and the plan it codes for."""

    def __init__(self, plan: Plan, data_dir: str) -> None:
        self.plan, self.coder = plan, BankCoder(Path(data_dir), plan.bank)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        files = [str(f) for f in batch["file"]]
        if self.coder.version != self.plan.version:
            moved = f"the bank is at version {self.coder.version} now, not {self.plan.version}"
            outcomes: list[Outcome] = [(f, None, moved) for f in files]
        else:
            outcomes = list(run_local(replace(self.plan, files=tuple(files)), self.coder))
        return {
            "file": np.array([f for f, _, _ in outcomes]),
            "entry": np.array([json.dumps(e) if e else "" for _, e, _ in outcomes]),
            "error": np.array([err or "" for _, _, err in outcomes]),
        }


def tokenize_on_ray(address: str, plan: Plan, data_dir: Path) -> Iterator[Outcome]:
    """Each file of `plan` coded on the cluster at `address` (this process joins it unless
    it already has) -> outcomes as they arrive. Inputs, outputs and the data dir must be on
    storage every node sees."""
    if not plan.files:
        return
    cluster = Cluster.connect(address)
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        ds = ray.data.from_items(
            [{"file": f} for f in plan.files], override_num_blocks=len(plan.files)
        )
        coded = ds.map_batches(
            _Tokenizer,
            fn_constructor_kwargs={"plan": plan, "data_dir": str(Path(data_dir).resolve())},
            batch_size=1,
            batch_format="numpy",
            num_cpus=1,
            concurrency=(1, min(cpus, len(plan.files))),
        )
        for row in coded.iter_rows():
            entry = json.loads(row["entry"]) if row["entry"] else None
            yield str(row["file"]), entry, str(row["error"]) or None
    finally:
        cluster.close()
