"""Shared test helpers: a float64 brute-force reference and seeded data sets."""

from __future__ import annotations

import numpy as np
import pytest


def brute_force(
    xq: np.ndarray, xb: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """float64 brute force, ties by lowest row: the definition of exact. D as reported."""
    q, b = np.asarray(xq, np.float64), np.asarray(xb, np.float64)
    if metric == "l2":
        dist = ((q[:, None, :] - b[None]) ** 2).sum(-1)
    else:
        if metric == "cosine":
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
            b = b / np.linalg.norm(b, axis=1, keepdims=True)
        dist = -(q @ b.T)
    rows = np.broadcast_to(np.arange(len(b)), dist.shape)
    I = np.lexsort((rows, dist), axis=1)[:, :k]
    D = np.take_along_axis(dist, I, 1)
    return (D if metric == "l2" else -D), I


@pytest.fixture(params=["cpu-style", "cpu-row-major", "gpu-style"])
def scan_style(request, monkeypatch) -> bool:
    """Runs a test with the scan in each style (`vqsearch.index._scan`): the GPU style's fixed
    shapes, norm column and single sync are checked on the CPU too, where CI runs; the CPU
    style with small fp32 query blocks bank-major (its default) and row-major."""
    from vqsearch.index import _exact, _scan

    gpu = request.param == "gpu-style"
    monkeypatch.setattr(_exact, "gpu_style", lambda device: gpu)
    if request.param == "cpu-row-major":
        monkeypatch.setattr(_scan, "BANK_MAJOR_QUERIES", 0)
    return gpu


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def datasets(
    rng: np.random.Generator, nq: int = 150, nb: int = 2500, d: int = 24
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random, offset far from the origin, and near-tie data (clusters of near-duplicates)."""
    base = rng.standard_normal((nb, d)).astype(np.float32)
    centers = rng.standard_normal((nb // 50, d)).astype(np.float32)
    near = (
        centers[rng.integers(0, len(centers), nb)] + 1e-4 * rng.standard_normal((nb, d))
    ).astype(np.float32)
    near_q = (
        centers[rng.integers(0, len(centers), nq)] + 1e-4 * rng.standard_normal((nq, d))
    ).astype(np.float32)
    return {
        "randn": (rng.standard_normal((nq, d)).astype(np.float32), base),
        "offset": (
            (rng.standard_normal((nq, d)) + 3000).astype(np.float32),
            (base + 3000).astype(np.float32),
        ),
        "near_ties": (near_q, near),
    }
