"""Shard actors on a Ray cluster, fanned out to and merged (`RayShards`), and the connection
that places them (`Cluster`, the service's `Placement`)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import exceptions as rx

from vqsearch.index import Queries, VQSearchError, merge_shards
from vqsearch.service import ShardsUnavailableError

from ._shard import BankShard

# Ray's errors that mean "this shard cannot answer now": its process or node died (it is
# restarting), it is unreachable, or it took too long. Never a partial answer: a 503.
DOWN = (rx.RayActorError, rx.ActorUnavailableError, rx.GetTimeoutError, rx.ObjectLostError)
INLINE_BYTES = 100 * 1024  # Ray sends arguments this small inside the call itself
ASKS = 3  # fan-outs before a search whose shards keep answering at other versions gives up


class RayShards:
    """The n shards of the bank in `path`, one actor each, spread over the nodes (SPREAD),
    restarted from the directory when their node dies (`max_restarts=-1`)."""

    def __init__(
        self, path: Path, n: int, metric: str, num_gpus: float = 0.0, timeout: float = 30.0
    ) -> None:
        self.path, self.n, self.metric, self.timeout = Path(path), n, metric, timeout
        actor = ray.remote(BankShard).options(
            num_cpus=1,
            num_gpus=num_gpus,
            max_restarts=-1,
            max_task_retries=0,  # a search is not retried on a restarted shard: a 503 instead
            scheduling_strategy="SPREAD",
        )
        self.actors: list[Any] = [actor.remote(str(self.path), s, n) for s in range(n)]

    def search(
        self, xq: Queries, k: int, version: Callable[[], str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k: every shard's float64 top-k, merged by (distance, id), once all the
        shards answer at one version that is the bank's `version()` as asked or as it is
        after they answered (a write landed meanwhile: the answer holds it too)."""
        return self._merged("search64", xq, k, version)

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
        """Approximate top-k: each shard's own index of `spec` proposes, its rows score the
        proposals exactly, and the answers merge by (distance, id) as exact ones do, at one
        version as `search` checks it."""
        return self._merged("search_approx", xq, k, version, spec, train_size, nprobe, k_factor)

    def prepare_index(self, spec: str, train_size: int, version: str) -> None:
        """Start every shard building its index of `spec` at `version` (not waited for: the
        first approximate search waits for what is not done)."""
        for a in self.actors:
            a.build_index.remote(spec, train_size, version)

    def _merged(
        self, method: str, xq: Queries, k: int, version: Callable[[], str], *extra: object
    ) -> tuple[np.ndarray, np.ndarray]:
        # one copy in the object store for all the shards, unless Ray would inline it anyway
        ref = ray.put(xq) if len(xq) * xq.d * 4 > INLINE_BYTES else xq
        want = version()
        for _ in range(ASKS):
            parts = self._ask(method, ref, k, *extra, want)
            got = {v for _, _, v in parts}
            if len(got) == 1 and got & {want, version()}:
                return merge_shards([(D, I) for D, I, _ in parts], k, self.metric)
            want = version()  # some shard read an older or newer directory: ask again
        raise ShardsUnavailableError(
            f"the shards of {self.path.name!r} answer at versions {sorted(got)}, not {want}"
        )

    def ids(self) -> list[np.ndarray]:
        """The ids each shard holds."""
        return self._ask("ids")

    def where(self) -> list[tuple[str, int]]:
        """(node id, pid) of each shard."""
        return self._ask("where")

    def _ask(self, method: str, *args: object) -> list[Any]:
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        try:
            return ray.get(refs, timeout=self.timeout)
        except rx.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, VQSearchError):  # the shard refused (a spec its rows cannot
                raise cause from exc  # train): the engine's error, answered as such
            raise
        except DOWN as exc:
            raise ShardsUnavailableError(
                f"a shard of {self.path.name!r} is not answering ({type(exc).__name__}); "
                "it restarts from the data dir: retry"
            ) from exc

    def close(self) -> None:
        # each shard removes its copies first, if it answers in time; then it is stopped
        with contextlib.suppress(rx.RayError):
            ray.get([a.close.remote() for a in self.actors], timeout=10)
        for a in self.actors:
            ray.kill(a)


class Cluster:
    """A connection to a Ray cluster, placing sharded banks on it (called as a `Placement`).
    `connect` joins the cluster unless this process already has (a test's driver), and
    `close` leaves only a connection it made."""

    def __init__(self, num_gpus: float, timeout: float, owns: bool) -> None:
        self.num_gpus, self.timeout, self.owns = num_gpus, timeout, owns

    @classmethod
    def connect(cls, address: str, num_gpus: float = 0.0, timeout: float = 30.0) -> Cluster:
        owns = not ray.is_initialized()
        if owns:
            # ray.init takes over SIGTERM (its handler exits at once); the server's own handler
            # stops gracefully, letting requests under way finish, then leaves the cluster
            main = threading.current_thread() is threading.main_thread()
            term = signal.getsignal(signal.SIGTERM) if main else None
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            if term is not None:
                signal.signal(signal.SIGTERM, term)
        return cls(num_gpus, timeout, owns)

    def __call__(self, path: Path, n: int, metric: str) -> RayShards:
        try:
            return RayShards(path, n, metric, self.num_gpus, self.timeout)
        except rx.RayError as exc:
            raise ShardsUnavailableError(f"the cluster cannot place {n} shards: {exc}") from exc

    def close(self) -> None:
        if self.owns:
            ray.shutdown()
