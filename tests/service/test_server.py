"""Against a real `vqsearch serve` (uvicorn on 127.0.0.1) driven by the AsyncClient over TCP."""

from __future__ import annotations

import asyncio

import numpy as np

from tests.service.conftest import Server
from vqsearch.client import AsyncClient


def _vq_codes(z: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """The VQGAN VectorQuantizer formula in float64 on (B, C, H, W) latents."""
    flat = np.moveaxis(z, 1, -1).reshape(-1, z.shape[1]).astype(np.float64)
    e = codebook.astype(np.float64)
    d = (flat**2).sum(1, keepdims=True) + (e**2).sum(1) - 2 * flat @ e.T
    return d.argmin(1).reshape(z.shape[0], *z.shape[2:])


async def test_tokenize_over_tcp_binary_and_json_agree(server: Server):
    """Codes and z_q from a real server equal the float64 VQ formula, in both wire formats,
    with a batch split into concurrent chunks."""
    rng = np.random.default_rng(11)
    codebook = rng.standard_normal((1024, 32)).astype(np.float32)
    z = rng.standard_normal((6, 32, 8, 8)).astype(np.float32)
    async with (
        AsyncClient(server.url, chunk_size=2) as c,
        AsyncClient(server.url, binary=False) as j,
    ):
        await c.create_bank("vq", codebook)
        got = await c.nearest("vq", z, channel_axis=1, return_quantized=True)
        again = await j.nearest("vq", z, channel_axis=1, return_quantized=True)
        expect = _vq_codes(z, codebook)
        np.testing.assert_array_equal(got.codes, expect)
        np.testing.assert_array_equal(again.codes, expect)
        np.testing.assert_array_equal(got.quantized, np.float32(again.quantized))
        np.testing.assert_array_equal(got.quantized, np.moveaxis(codebook[expect], -1, 1))
        np.testing.assert_array_equal(
            await c.decode("vq", got.codes, channel_axis=1), got.quantized
        )


async def test_concurrent_requests_and_restart_keeps_banks(tmp_path):
    """32 concurrent searches all answer exactly; after a restart the bank, its version and an
    acknowledged append are still there."""
    srv = Server(tmp_path / "d").start()
    rng = np.random.default_rng(5)
    xb = rng.standard_normal((2000, 24)).astype(np.float32)
    try:
        async with AsyncClient(srv.url) as c:
            await c.create_bank("b", xb, metric="cosine")
            extra = await c.add("b", xb[:5] * 2)
            qs = [rng.standard_normal((16, 24)).astype(np.float32) for _ in range(32)]
            results = await asyncio.gather(*(c.search("b", q, k=3) for q in qs))
            for q, (_, ids) in zip(qs, results, strict=True):
                single = await c.search("b", q, k=3)
                np.testing.assert_array_equal(ids, single.ids)
            before = await c.get_bank("b")
    finally:
        srv.stop()
    srv.start()
    try:
        async with AsyncClient(srv.url) as c:
            after = await c.get_bank("b")
            assert after["version"] == before["version"] and after["count"] == 2005
            assert extra.tolist() == [2000, 2001, 2002, 2003, 2004]
            vec = await c.decode("b", extra)
            np.testing.assert_allclose(
                vec, xb[:5] / np.linalg.norm(xb[:5], axis=1, keepdims=True), rtol=1e-6
            )
    finally:
        srv.stop()
