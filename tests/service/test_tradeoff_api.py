"""Tradeoff over HTTP: background sweeps, the report's conditions, mode=auto, the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import numpy as np

from tests.service.conftest import CODEBOOK, Server, app_client
from vqsearch.client import AsyncClient
from vqsearch.service import create_app

FAST = {"batch_sizes": [1, 16], "min_seconds": 0.0, "n_queries": 60}


async def _wait(api: httpx.AsyncClient, name: str) -> dict:
    for _ in range(1200):
        job = (await api.get(f"/v1/banks/{name}/tradeoff")).json()
        if job["state"] in ("done", "failed"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(job)


async def test_sweep_builds_the_default_index_and_reports_conditions(api):
    """With no index, a sweep builds the default spec first, then reports exact and its grid,
    measured on perturbed bank vectors, with machine, threads and device."""
    assert (await api.get("/v1/banks/cb/tradeoff")).json() == {
        "state": "none",
        "progress": 0.0,
        "report": None,
    }
    r = await api.post("/v1/banks/cb/tradeoff", json=FAST)
    assert r.status_code == 202 and r.json()["state"] in ("queued", "building index", "measuring")
    job = await _wait(api, "cb")
    assert job["state"] == "done" and job["progress"] == 1.0, job
    rep = job["report"]
    info = (await api.get("/v1/banks/cb")).json()
    assert info["index"]["state"] == "ready" and rep["index_spec"] == info["index"]["spec"]
    assert rep["query_source"] == "perturbed" and rep["n_queries"] == 60 and rep["device"] == "cpu"
    assert rep["bank_version"] == info["version"] and rep["machine"]["faiss_threads"] >= 1
    specs = {p["spec"] for p in rep["points"]}
    assert specs == {"exact", rep["index_spec"]}


async def test_user_queries_and_extra_specs(api, rng):
    """Queries in the body are used as given; extra specs are measured beside the own index."""
    xq = (CODEBOOK[:40] + 0.1 * rng.standard_normal((40, 16))).astype(np.float32)
    await api.put("/v1/banks/cb/index", json={"spec": "PQ8x4fs"})
    r = await api.post(
        "/v1/banks/cb/tradeoff", json=FAST | {"queries": xq.tolist(), "specs": ["PQ4x4fs"]}
    )
    assert r.status_code == 202
    rep = (await _wait(api, "cb"))["report"]
    assert rep["query_source"] == "user" and rep["n_queries"] == 40
    assert {p["spec"] for p in rep["points"]} == {"exact", "PQ8x4fs", "PQ4x4fs"}
    bad = await api.post("/v1/banks/cb/tradeoff", json={"specs": ["Bogus7"]})
    assert bad.status_code == 422 and "Bogus7" in bad.json()["detail"]


async def test_reservoir_of_real_queries_is_used(settings, rng):
    """With VQSEARCH_QUERY_RESERVOIR set, real search traffic becomes the evaluation set."""
    async with app_client(settings.model_copy(update={"query_reservoir": 200})) as api:
        await api.put("/v1/banks/cb", json={"vectors": CODEBOOK.tolist()})
        for _ in range(3):
            q = rng.standard_normal((50, 16)).astype(np.float32)
            await api.post("/v1/banks/cb/search", json={"queries": q.tolist(), "k": 1})
        assert (await api.get("/v1/banks/cb")).json()["query_sample"] == 150
        await api.post("/v1/banks/cb/tradeoff", json=FAST)
        rep = (await _wait(api, "cb"))["report"]
        assert rep["query_source"] == "reservoir" and rep["n_queries"] == 150


async def test_auto_mode_picks_measured_setting_and_falls_back_to_exact(api):
    """auto answers exact without a sweep, then the fastest measured own-index setting that
    reached the target, and exact again once a write makes the sweep stale."""
    q = {"queries": CODEBOOK[:8].tolist(), "k": 1, "mode": "auto", "target_recall": 0.01}
    r = await api.post("/v1/banks/cb/search", json=q)
    assert r.headers["x-vqsearch-setting"] == "exact" and r.json()["setting"]["spec"] == "exact"
    await api.put("/v1/banks/cb/index", json={"spec": "IVF16,PQ8x4fs,RFlat"})
    await api.post("/v1/banks/cb/tradeoff", json=FAST)
    rep = (await _wait(api, "cb"))["report"]
    own = [
        p
        for p in rep["points"]
        if p["spec"] == "IVF16,PQ8x4fs,RFlat" and p["recall_10_at_10"] >= 0.01
    ]
    best = max(own, key=lambda p: p["qps"]["16"])
    r = await api.post("/v1/banks/cb/search", json=q)
    setting = r.json()["setting"]
    assert (setting["nprobe"], setting["k_factor"]) == (best["nprobe"], best["k_factor"])
    assert r.headers["x-vqsearch-setting"].startswith("IVF16,PQ8x4fs,RFlat;nprobe=")
    n = await api.post(
        "/v1/banks/cb/nearest",
        json={"queries": CODEBOOK[:4].tolist(), "mode": "auto", "target_recall": 1.0},
    )
    exact_or_perfect = n.json()["setting"]
    assert exact_or_perfect["spec"] == "exact" or exact_or_perfect["measured_recall"] == 1.0
    await api.post("/v1/banks/cb/vectors", json={"vectors": CODEBOOK[:1].tolist()})
    r = await api.post("/v1/banks/cb/search", json=q)
    assert r.json()["setting"]["spec"] == "exact" and "version" in r.json()["setting"]["reason"]


async def test_client_tradeoff_methods(settings):
    """The async client starts a sweep, waits for it, and sends auto mode with its target."""
    app = create_app(settings)
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request)

    tr = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), AsyncClient("http://app", transport=tr) as c:
        c._http.event_hooks["request"].append(record)
        await c.create_bank("cb", CODEBOOK)
        await c.tradeoff("cb", batch_sizes=[1], min_seconds=0.0, n_queries=30)
        job = await c.wait_tradeoff("cb", timeout=120)
        assert job.report is not None and job.report.points[0].spec == "exact"
        res = await c.search("cb", CODEBOOK[:3], k=1, mode="auto", target_recall=0.5)
        assert res.ids.shape == (3, 1)
    assert sent[-1].url.params["mode"] == "auto" and sent[-1].url.params["target_recall"] == "0.5"


def _compare(*args: str) -> subprocess.CompletedProcess[str]:
    fast = ["--batch-sizes", "1", "8", "--min-seconds", "0", "--n-queries", "40"]
    return subprocess.run(
        [sys.executable, "-m", "vqsearch", "compare", *args, *fast],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_compare_cli_against_a_server_and_locally(tmp_path):
    """`vqsearch compare` works through the client against a real server and on a local .npy,
    printing the table and writing the JSON report and a PNG."""
    srv = Server(tmp_path / "srv").start()
    try:
        httpx.put(f"{srv.url}/v1/banks/cb", json={"vectors": CODEBOOK.tolist()}, timeout=30)
        remote = _compare("--server", srv.url, "--bank", "cb", "--out", str(tmp_path / "remote"))
    finally:
        srv.stop()
    np.save(tmp_path / "xb.npy", CODEBOOK)
    local = _compare(
        "--npy", str(tmp_path / "xb.npy"), "--spec", "PQ4x4fs", "--out", str(tmp_path / "local")
    )
    for name, run in (("remote", remote), ("local", local)):
        assert run.returncode == 0, run.stderr[-2000:]
        assert "| exact |" in run.stdout and "%" in run.stderr  # table, progress bar
        rep = json.loads((tmp_path / f"{name}.json").read_text())
        assert rep["points"][0]["spec"] == "exact"
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
