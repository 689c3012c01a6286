"""A node dies under load: the shard it ran restarts on a surviving node from the data dir.
Meanwhile requests get 503 with Retry-After or the right answer, never a partial one, and
every write the server acknowledged is in the answers once the shard is back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np

from tests.ray.conftest import restore_workers
from vqsearch.service import Settings, create_app

D = 16
CHUNK = 50
BOUND_S = 90  # the whole load, the restart and the recovery, at most


async def test_a_node_dies_mid_load(cluster, tmp_path: Path, rng):
    settings = Settings(data_dir=tmp_path / "data", device="cpu", ray_address=cluster.address)
    app = create_app(settings)
    rows = rng.standard_normal((4000, D)).astype(np.float32)  # distinct: each row finds itself
    acked: list[int] = []
    statuses: list[tuple[float, int]] = []  # (seconds since the start, status)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            r = await c.put(
                "/v1/banks/s?shards=2",
                json={"vectors": rows[:1000].tolist(), "ids": list(range(1000))},
            )
            assert r.status_code == 201, r.text
            acked += range(1000)
            placed = app.state.registry.entries["s"].placed
            on = {node for node, _ in placed.where()}
            victim = next(n for n in cluster.worker_nodes if n.node_id in on)
            t0 = time.monotonic()
            deadline = t0 + BOUND_S

            async def write() -> None:
                for start in range(1000, len(rows), CHUNK):
                    ids = list(range(start, start + CHUNK))
                    r = await c.post(
                        "/v1/banks/s/vectors",
                        json={"vectors": rows[start : start + CHUNK].tolist(), "ids": ids},
                    )
                    assert r.status_code == 200, r.text
                    acked.extend(ids)
                    await asyncio.sleep(0.05)

            async def search(stop: asyncio.Event) -> None:
                while not stop.is_set() and time.monotonic() < deadline:
                    ids = np.array(acked[-30:] + acked[:30:3])
                    r = await c.post(
                        "/v1/banks/s/search", json={"queries": rows[ids].tolist(), "k": 1}
                    )
                    statuses.append((time.monotonic() - t0, r.status_code))
                    if r.status_code == 503:
                        assert int(r.headers["retry-after"]) > 0
                        assert "shard" in r.json()["detail"]
                    else:
                        assert r.status_code == 200, r.text
                        assert [i for (i,) in r.json()["ids"]] == ids.tolist()  # never partial
                    await asyncio.sleep(0.02)

            async def kill() -> None:
                await asyncio.sleep(0.5)
                await asyncio.to_thread(cluster.remove_node, victim, allow_graceful=False)

            stop = asyncio.Event()
            searcher = asyncio.create_task(search(stop))
            await asyncio.gather(write(), kill())
            # back: every acknowledged row is found, by its own id, within the bound
            while time.monotonic() < deadline:
                r = await c.post(
                    "/v1/banks/s/search", json={"queries": rows[acked].tolist(), "k": 1}
                )
                statuses.append((time.monotonic() - t0, r.status_code))
                if r.status_code == 200:
                    break
                assert r.status_code == 503, r.text
                await asyncio.sleep(0.5)
            stop.set()
            await searcher
            assert r.status_code == 200, f"the shard did not come back in {BOUND_S} s"
            assert [i for (i,) in r.json()["ids"]] == acked
            assert sorted(acked) == list(range(len(rows)))
            assert 503 in {s for _, s in statuses}  # the outage was seen, and said so
            moved = {node for node, _ in placed.where()}
            assert victim.node_id not in moved
    restore_workers(cluster)
    print("statuses:", " ".join(f"{t:.1f}s:{s}" for t, s in statuses))
