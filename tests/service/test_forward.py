"""A replica that serves reads and forwards writes (what a Ray Serve replica of the ingress
is, `vqsearch.ray`), here with its writer in the same process: every write is the writer's
answer, and the replica's next read already holds it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np

from tests.conftest import brute_force
from vqsearch.service import (
    Forwarded,
    LocalWriter,
    Settings,
    WriterAnswer,
    WriterUnavailableError,
    create_app,
)


@asynccontextmanager
async def writer_and_replica(
    settings: Settings,
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, list[Forwarded]]]:
    """Clients of the writer and of a replica forwarding to it, and what was forwarded."""
    writer_app = create_app(settings)
    sent: list[Forwarded] = []
    async with writer_app.router.lifespan_context(writer_app):
        local = LocalWriter(writer_app)

        async def forward(request: Forwarded) -> WriterAnswer:
            sent.append(request)
            return await local(request)

        # it never re-reads the data dir on its own clock within the test
        replica_settings = settings.model_copy(update={"read_only": True, "refresh_seconds": 3600})
        replica_app = create_app(replica_settings, forward=forward)
        async with replica_app.router.lifespan_context(replica_app):
            w = httpx.AsyncClient(transport=httpx.ASGITransport(writer_app), base_url="http://w")
            r = httpx.AsyncClient(transport=httpx.ASGITransport(replica_app), base_url="http://r")
            async with w, r:
                yield w, r, sent
        await local.aclose()


def _same(a: httpx.Response, b: httpx.Response) -> None:
    assert (a.status_code, a.content) == (b.status_code, b.content)


async def test_writes_go_to_the_writer_and_the_next_read_holds_them(tmp_path: Path, rng):
    settings = Settings(data_dir=tmp_path / "data", device="cpu", demo=False)
    xb = rng.standard_normal((300, 8)).astype(np.float32)
    async with writer_and_replica(settings) as (w, r, sent):
        res = await r.put("/v1/banks/b", json={"vectors": xb.tolist()})
        assert res.status_code == 201, res.text
        assert [(f.method, f.path) for f in sent] == [("PUT", "/v1/banks/b")]
        # read at once through the replica, which has not refreshed on its own
        got = await r.post("/v1/banks/b/search", json={"queries": xb[:5].tolist(), "k": 3})
        _same(got, await w.post("/v1/banks/b/search", json={"queries": xb[:5].tolist(), "k": 3}))
        _, Ib = brute_force(xb[:5], xb, 3, "l2")
        assert got.json()["ids"] == Ib.tolist()

        new = rng.standard_normal((4, 8)).astype(np.float32)
        res = await r.post("/v1/banks/b/vectors", json={"vectors": new.tolist()})
        assert res.status_code == 200, res.text
        ids = res.json()["ids"]
        got = await r.post("/v1/banks/b/nearest", json={"queries": new.tolist()})
        assert got.json()["codes"] == ids
        res = await r.request("DELETE", "/v1/banks/b/vectors", json={"ids": ids[:2]})
        assert res.status_code == 200, res.text
        got = await r.post("/v1/banks/b/nearest", json={"queries": new.tolist()})
        assert got.json()["codes"][2:] == ids[2:] and not set(got.json()["codes"][:2]) & set(ids)
        # the same bank, but the usage figures are each process's own nearest calls
        mine, its = (await r.get("/v1/banks/b")).json(), (await w.get("/v1/banks/b")).json()
        assert mine.pop("usage")["served"] == 8 and its.pop("usage")["served"] == 0
        assert mine == its

        # errors are the writer's own: a wrong d, a bank that exists
        bad = {"vectors": [[1.0, 2.0]]}
        for method, path, body in (
            ("POST", "/v1/banks/b/vectors", bad),
            ("PUT", "/v1/banks/b", {"vectors": xb.tolist()}),
        ):
            _same(
                await r.request(method, path, json=body), await w.request(method, path, json=body)
            )

        res = await r.delete("/v1/banks/b")
        assert res.status_code == 200, res.text
        assert (await r.get("/v1/banks/b")).status_code == 404
        assert (await r.get("/v1/banks")).json() == []
        assert {f.method for f in sent} == {"PUT", "POST", "DELETE"}
        assert all(f.path.startswith("/v1/banks/b") for f in sent)


async def test_reads_are_never_forwarded_and_a_missing_writer_is_a_503(tmp_path: Path, rng):
    settings = Settings(data_dir=tmp_path / "data", device="cpu", demo=False, read_only=True)

    async def down(request: Forwarded) -> WriterAnswer:
        raise WriterUnavailableError("the writer is restarting: retry")

    app = create_app(settings, forward=down)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as r:
            res = await r.put("/v1/banks/b", json={"vectors": [[1.0, 2.0]]})
            assert res.status_code == 503
            assert res.headers["retry-after"] == "2"
            assert res.json()["detail"] == "the writer is restarting: retry"
            # reads (POST ones too) are answered here: an unknown bank is this app's 404
            res = await r.post("/v1/banks/b/search", json={"queries": [[1.0, 2.0]], "k": 1})
            assert res.status_code == 404
            assert (await r.get("/healthz")).status_code == 200
