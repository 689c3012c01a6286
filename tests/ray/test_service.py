"""The service on a Ray cluster (`VQSEARCH_RAY_ADDRESS`): a bank made with `?shards=2` answers
every route as a bank made whole does, after writes and after a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import brute_force
from tests.ray.test_shards import clustered, queries
from tests.service.conftest import app_client
from vqsearch.service import Settings


def _settings(cluster, data: Path) -> Settings:
    return Settings(data_dir=data, device="cpu", ray_address=cluster.address, ray_timeout=60)


async def _answers(c, xq: np.ndarray) -> dict[str, object]:
    """Each bank's answers to the same search, nearest and decode requests."""
    out: dict[str, object] = {}
    for name in ("whole", "sharded"):
        r = await c.post(f"/v1/banks/{name}/search", json={"queries": xq.tolist(), "k": 4})
        assert r.status_code == 200, r.text
        s = r.json()
        r = await c.post(
            f"/v1/banks/{name}/nearest", json={"queries": xq.tolist(), "return_error": True}
        )
        assert r.status_code == 200, r.text
        n = r.json()
        r = await c.post(f"/v1/banks/{name}/decode", json={"codes": n["codes"]})
        assert r.status_code == 200, r.text
        out[name] = (s["ids"], s["distances"], n["codes"], n["errors"], r.json())
    return out


async def test_a_sharded_bank_answers_as_a_whole_one(cluster, tmp_path: Path, rng):
    xb = clustered(rng, 600)
    xq = queries(rng, xb)
    data = tmp_path / "data"
    async with app_client(_settings(cluster, data)) as c:
        for name, shards in (("whole", ""), ("sharded", "?shards=2")):
            r = await c.put(f"/v1/banks/{name}{shards}", json={"vectors": xb.tolist()})
            assert r.status_code == 201, r.text
            assert r.json()["shards"] == (2 if shards else 1)
        answers = await _answers(c, xq)
        assert answers["sharded"] == answers["whole"]

        new = clustered(rng, 40)
        for name in ("whole", "sharded"):
            r = await c.post(
                f"/v1/banks/{name}/vectors",
                json={"vectors": new.tolist(), "ids": list(range(7000, 7040))},
            )
            assert r.status_code == 200, r.text
            r = await c.request(
                "DELETE", f"/v1/banks/{name}/vectors", json={"ids": list(range(0, 600, 5))}
            )
            assert r.status_code == 200, r.text
        xq2 = np.concatenate([xq, new[:10] + 0.01])
        answers = await _answers(c, xq2)
        assert answers["sharded"] == answers["whole"]
        live = np.concatenate(
            [np.delete(np.arange(600), np.arange(0, 600, 5)), np.arange(7000, 7040)]
        )
        rows = np.concatenate([np.delete(xb, np.arange(0, 600, 5), 0), new])
        _, Ib = brute_force(xq2, rows, 4, "l2")
        assert answers["sharded"][0] == live[Ib].tolist()  # type: ignore[index]
        info = (await c.get("/v1/banks/sharded")).json()
        assert (info["shards"], info["count"]) == (2, 600 - 120 + 40)

    # a restart over the same data dir places the shards again
    async with app_client(_settings(cluster, data)) as c:
        assert (await c.get("/v1/banks/sharded")).json()["shards"] == 2
        again = await _answers(c, xq2)
        assert again == answers
        r = await c.delete("/v1/banks/sharded")
        assert r.status_code == 200, r.text


async def test_a_sharded_bank_without_the_cluster_is_served_whole(cluster, tmp_path: Path, rng):
    """The data dir of a sharded bank opened by a server without Ray: the same answers."""
    xb = clustered(rng, 200)
    xq = queries(rng, xb)
    data = tmp_path / "data"
    got = {}
    for settings in (_settings(cluster, data), Settings(data_dir=data, device="cpu")):
        async with app_client(settings) as c:
            if not got:
                r = await c.put("/v1/banks/s?shards=2", json={"vectors": xb.tolist()})
                assert r.status_code == 201, r.text
            r = await c.post("/v1/banks/s/search", json={"queries": xq.tolist(), "k": 3})
            assert r.status_code == 200, r.text
            got[settings.ray_address] = r.json()
            assert (await c.get("/v1/banks/s")).json()["shards"] == 2
    assert got[cluster.address] == got[None]


async def test_index_tradeoff_and_usage_work_on_a_sharded_bank(cluster, tmp_path: Path, rng):
    """The routes beyond exact search. Approximate: each shard builds its own index of the
    spec over its rows and re-ranks its proposals exactly, merged by (distance, id): every
    distance is its id's float64 one, recall is measured against exact, a spec the smallest
    shard cannot train is a 422, and after a write the shards answer at the new version. A
    tradeoff sweep measured through the shards, as they serve; code usage."""
    from tests.service.test_api import _wait_index
    from tests.service.test_tradeoff_api import FAST, _wait

    xb = clustered(rng, 600)
    xq = queries(rng, xb)
    settings = _settings(cluster, tmp_path / "data").model_copy(update={"usage_window": 4096})
    async with app_client(settings) as c:
        recall = {}
        for name, shards in (("whole", ""), ("sharded", "?shards=2")):
            r = await c.put(f"/v1/banks/{name}{shards}", json={"vectors": xb.tolist()})
            assert r.status_code == 201, r.text
            r = await c.put(f"/v1/banks/{name}/index", json={"spec": "PQ12x4fs"})
            assert r.status_code == 202, r.text
            assert (await _wait_index(c, name))["state"] == "ready"
            r = await c.post(
                f"/v1/banks/{name}/search?mode=approx&k_factor=2",
                json={"queries": xq.tolist(), "k": 4},
            )
            assert r.status_code == 200, r.text
            I, D = np.array(r.json()["ids"]), np.array(r.json()["distances"])
            want = ((xq[:, None, :].astype(np.float64) - xb[I].astype(np.float64)) ** 2).sum(-1)
            np.testing.assert_allclose(D, want, rtol=1e-6)
            recall[name] = np.mean(
                [
                    len(set(a) & set(b)) / 4
                    for a, b in zip(I, brute_force(xq, xb, 4, "l2")[1], strict=True)
                ]
            )
        # each shard proposes k x k_factor of its own rows: at least the whole bank's recall
        assert recall["sharded"] >= recall["whole"] - 0.05, recall
        r = await c.put("/v1/banks/sharded/index", json={"spec": "IVF512,PQ12x4fs"})
        assert r.status_code == 422 and "IVF512" in r.json()["detail"], r.text

        new = rng.standard_normal((5, xb.shape[1])).astype(np.float32) * 3 + 40  # far away
        r = await c.post(
            "/v1/banks/sharded/vectors",
            json={"vectors": new.tolist(), "ids": list(range(9000, 9005))},
        )
        assert r.status_code == 200, r.text
        assert (await _wait_index(c, "sharded"))["state"] == "ready"
        r = await c.post(
            "/v1/banks/sharded/search?mode=approx&k_factor=8",
            json={"queries": (new + 0.0001).tolist(), "k": 1},
        )
        assert r.status_code == 200, r.text
        assert np.array(r.json()["ids"])[:, 0].tolist() == list(range(9000, 9005))

        r = await c.post("/v1/banks/sharded/tradeoff", json={**FAST, "queries": xq.tolist()})
        assert r.status_code == 202, r.text
        job = await _wait(c, "sharded")
        assert job["state"] == "done", job
        assert job["report"]["served_by"] == "2 shards"
        points = job["report"]["points"]
        assert [p["recall_1_at_1"] for p in points if p["spec"] == "exact"] == [1.0]
        # the sweep measured the shards as they serve: its recall is that of mode=approx
        r = await c.post("/v1/banks/sharded/search", json={"queries": xq.tolist(), "k": 10})
        truth = np.array(r.json()["ids"])
        own = [p for p in points if p["spec"] == "PQ12x4fs"]
        assert len(own) == 5
        for p in own:
            r = await c.post(
                f"/v1/banks/sharded/search?mode=approx&k_factor={p['k_factor']}",
                json={"queries": xq.tolist(), "k": 10},
            )
            got = np.array(r.json()["ids"])
            hits = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth, strict=True)])
            assert p["recall_10_at_10"] == pytest.approx(hits), p

        r = await c.post("/v1/banks/sharded/nearest", json={"queries": xb[:50].tolist()})
        assert r.status_code == 200, r.text
        r = await c.get("/v1/banks/sharded/usage")
        assert r.status_code == 200, r.text
        assert sum(r.json()["counts"]) == 50
