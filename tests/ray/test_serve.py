"""The HTTP API from Ray Serve replicas (`VQSEARCH_RAY_REPLICAS`) on the test cluster: two
read replicas behind Serve's proxy on 127.0.0.1 and one writer deployment. Its answers are a
plain server's, byte for byte; a write acknowledged through any replica is in the next read
through every one; a writer that dies comes back with every acknowledged write."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import ray
from ray import serve

from tests.conftest import brute_force
from tests.ray.test_shards import clustered, queries
from tests.service.conftest import app_client, free_port
from vqsearch.client import Client
from vqsearch.ray._serve import APP_NAME, build
from vqsearch.service import Settings

REPLICAS = 2


def distinct(rng: np.random.Generator, n: int) -> np.ndarray:
    """n rows of `clustered` with no copy among them (each its own nearest row)."""
    return clustered(rng, 10 * n)[2::10]


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory) -> Iterator[tuple[str, Settings]]:
    """(the proxy's URL, the settings served)."""
    port = free_port()
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("serve") / "data",
        device="cpu",
        demo=False,
        ray_address=cluster.address,
        ray_replicas=REPLICAS,
        ray_replica_cpus=0,  # the cluster's 3 CPUs are for the shards
        ray_timeout=60,
        host="127.0.0.1",
        port=port,
    )
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build(settings), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}", settings
    finally:
        serve.shutdown()


def _replicas(deployment: str) -> int:
    status = serve.status().applications[APP_NAME].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def _exchange(xq: np.ndarray) -> list[tuple[str, str, Any]]:
    return [
        ("POST", "/v1/banks/cb/search", {"queries": xq.tolist(), "k": 4}),
        ("POST", "/v1/banks/cb/nearest", {"queries": xq.tolist(), "return_error": True}),
        ("POST", "/v1/banks/cb/decode", {"codes": [3, 1, 4]}),
        ("POST", "/v1/banks/cb/search", {"queries": xq.tolist(), "k": 0}),  # 422
        ("POST", "/v1/banks/cb/search", {"queries": [[1.0, 2.0]], "k": 1}),  # wrong d: 422
        ("POST", "/v1/banks/nope/search", {"queries": xq.tolist(), "k": 1}),  # 404
        ("PUT", "/v1/banks/cb", {"vectors": xq.tolist()}),  # exists: 409
        ("POST", "/v1/banks/cb/vectors", {"vectors": xq[:3].tolist(), "ids": [0, 1, 2]}),  # 409
    ]


async def test_replicas_answer_as_a_plain_server_does(served, tmp_path: Path, rng):
    url, settings = served
    assert _replicas("http") == REPLICAS and _replicas("writer") == 1
    xb = clustered(rng, 500)
    xq = queries(rng, xb)
    plain = settings.model_copy(update={"data_dir": tmp_path / "plain", "ray_address": None})
    with httpx.Client(base_url=url, timeout=60) as s:
        async with app_client(plain) as p:
            r = s.put("/v1/banks/cb", json={"vectors": xb.tolist()})
            assert r.status_code == 201, r.text
            assert (await p.put("/v1/banks/cb", json={"vectors": xb.tolist()})).status_code == 201
            for method, path, body in _exchange(xq):
                theirs = await p.request(method, path, json=body)
                for _ in range(3):  # each time through whichever replica the proxy picks
                    ours = s.request(method, path, json=body)
                    assert (ours.status_code, ours.content) == (
                        theirs.status_code,
                        theirs.content,
                    ), f"{method} {path}"
            _, Ib = brute_force(xq, xb, 4, "l2")
            r = s.post("/v1/banks/cb/search", json={"queries": xq.tolist(), "k": 4})
            assert r.json()["ids"] == Ib.tolist()
            mine, its = s.get("/v1/banks/cb").json(), (await p.get("/v1/banks/cb")).json()
            mine.pop("usage"), its.pop("usage")  # each process counts the nearest it served
            mine.pop("bytes_on_disk"), its.pop("bytes_on_disk")  # the data dirs hold more
            assert mine == its
            assert s.delete("/v1/banks/cb").status_code == 200


def test_a_write_through_any_replica_is_in_the_next_read_through_every_one(served, rng):
    url, _ = served
    xb = clustered(rng, 300)
    with Client(url) as c:
        c.create_bank("raw", xb, shards=2)
        assert c.get_bank("raw").shards == 2
        for round in range(15):
            new = distinct(rng, 5)
            ids = c.add("raw", new)
            for _ in range(2):  # a new connection each: the proxy picks a replica each time
                with httpx.Client(base_url=url, timeout=60) as fresh:
                    r = fresh.post("/v1/banks/raw/nearest", json={"queries": new.tolist()})
                    assert r.status_code == 200, r.text
                    assert r.json()["codes"] == ids.tolist(), f"round {round}"
        assert c.get_bank("raw").count == 300 + 15 * 5
        c.delete_bank("raw")


def test_a_killed_writer_comes_back_with_every_acknowledged_write(served, rng):
    url, _ = served
    xb = clustered(rng, 200)
    (writer,) = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#writer#")
    ]
    with Client(url) as c:
        c.create_bank("kw", xb)
        rows = [distinct(rng, 10) for _ in range(3)]
        acked = [(c.add("kw", x), x) for x in rows]
        ray.kill(ray.get_actor(writer, namespace="serve"), no_restart=True)
        seen: set[int] = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            x = distinct(rng, 2)
            with httpx.Client(base_url=url, timeout=30) as fresh:
                r = fresh.post("/v1/banks/kw/vectors", json={"vectors": x.tolist()})
            seen.add(r.status_code)
            if r.status_code == 200:
                acked.append((np.array(r.json()["ids"]), x))
                break
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            time.sleep(0.5)
        assert 200 in seen, f"the writer did not come back in 90 s: {seen}"
        assert c.get_bank("kw").count == 200 + sum(len(ids) for ids, _ in acked)
        for ids, x in acked:
            assert c.nearest("kw", x).codes.tolist() == ids.tolist()
        c.delete_bank("kw")
