"""Tradeoff sweeps: recall figures, the Pareto frontier, picking a setting, plots and queries."""

from __future__ import annotations

import numpy as np
import pytest
from faiss.contrib.datasets import SyntheticDataset

from tests.conftest import brute_force
from vqsearch import _report
from vqsearch.index import (
    ApproxIndex,
    Bank,
    pareto_front,
    perturbed_queries,
    pick,
    search_proposed,
    sweep,
)
from vqsearch.service._sampling import Reservoir


@pytest.fixture(scope="module")
def swept():
    ds = SyntheticDataset(16, 0, 3000, 120, seed=3)
    xb, xq = ds.get_database(), ds.get_queries()
    ids = np.arange(len(xb)) + 500
    own = ApproxIndex.build(xb, ids, spec="IVF16,PQ8x4fs,RFlat")
    codes = ApproxIndex.build(xb, ids, spec="IVF16,PQ4x4fs")  # re-ranked from the bank
    report = sweep(
        xb,
        ids,
        "l2",
        xq,
        indexes=[own, codes],
        specs=["PQ4x4fs"],
        batch_sizes=(1, 32),
        primary_batch=32,
        min_seconds=0.0,
    )
    return xb, xq, ids, own, codes, report


def test_recall_matches_an_independent_computation(swept):
    """Each point's 1-recall@1 and 10-recall@10 equal a recount from numpy brute force, for
    the RFlat index (faiss re-ranks) and the codes-only one (the bank re-ranks)."""
    xb, xq, ids, own, codes, report = swept
    gt = ids[brute_force(xq, xb, 10, "l2")[1]]
    bank = Bank(16)
    bank.add(xb, ids)
    seen = set()
    for p in report["points"]:
        if p["spec"] == own.spec:
            I = own.search(xq, 10, nprobe=p["nprobe"], k_factor=p["k_factor"])[1]
        elif p["spec"] == codes.spec:
            kw = {"nprobe": p["nprobe"], "k_factor": p["k_factor"]}
            I = search_proposed(bank, codes, xq, 10, **kw)[1]
        else:
            continue
        seen.add(p["spec"])
        r1 = np.mean(I[:, 0] == gt[:, 0])
        r10 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, gt, strict=True)])
        assert p["recall_1_at_1"] == pytest.approx(r1) and p["recall_10_at_10"] == pytest.approx(
            r10
        )
    assert seen == {own.spec, codes.spec}


def test_report_covers_the_grid_exact_and_extra_specs(swept):
    """Exact (recall 1), every nprobe x k_factor of the own index, and the extra spec appear,
    with QPS and latency at each batch size and the conditions of the run."""
    *_, own, codes, report = swept
    pts = report["points"]
    exact = pts[0]
    assert exact["spec"] == "exact" and exact["recall_1_at_1"] == 1.0 == exact["recall_10_at_10"]
    for spec in (own.spec, codes.spec):
        grid = {(p["nprobe"], p["k_factor"]) for p in pts if p["spec"] == spec}
        assert grid == {(n, float(f)) for n in (1, 2, 4, 8, 16) for f in (1, 2, 4, 8, 16)}
    extra = [p for p in pts if p["spec"] not in ("exact", own.spec, codes.spec)]
    assert {p["spec"] for p in extra} == {"PQ4x4fs"}
    assert sorted(p["k_factor"] for p in extra) == [1.0, 2.0, 4.0, 8.0, 16.0]
    for p in pts:
        assert set(p["qps"]) == {"1", "32"} and p["p99_ms"]["32"] >= p["p50_ms"]["32"] > 0
    assert report["machine"]["torch_threads"] >= 1 and report["n_queries"] == 120
    assert any(p["pareto"] for p in pts)


def test_pareto_front_on_a_hand_made_curve():
    """Dominated points (worse or equal on both, worse on one) are off the frontier."""
    recall = [1.0, 0.9, 0.9, 0.8, 0.95, 0.5]
    qps = [10, 100, 50, 90, 100, 100]
    assert pareto_front(recall, qps) == [True, False, False, False, True, False]
    assert pareto_front([0.5, 0.5], [1, 1]) == [True, True]  # equal points do not dominate


def _report_of(points):
    return {
        "primary_batch": 64,
        "points": [
            {
                "spec": s,
                "nprobe": n,
                "k_factor": None,
                "recall_1_at_1": r,
                "recall_10_at_10": r,
                "qps": {"64": q},
                "pareto": f,
            }
            for s, n, r, q, f in points
        ],
    }


def test_pick_fastest_reaching_target_and_fall_back_to_exact():
    """pick returns the fastest point at or above the target, else exact."""
    rep = _report_of(
        [
            ("exact", None, 1.0, 10, True),
            ("IVF", 1, 0.80, 900, True),
            ("IVF", 4, 0.96, 500, True),
            ("IVF", 8, 0.99, 200, True),
            ("PQ", None, 0.97, 800, True),
        ]
    )
    assert pick(rep, 0.95)["spec"] == "PQ"
    assert (pick(rep, 0.95, spec="IVF")["nprobe"]) == 4
    assert pick(rep, 0.999, spec="IVF")["spec"] == "exact"
    assert pick(rep, 0.5, spec="IVF")["nprobe"] == 1


def test_plot_data_and_png(tmp_path, swept):
    """The PNG is a real PNG; the curves drawn are each spec's best settings, exact included."""
    *_, own, codes, report = swept
    drawn = _report.plot(report, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(drawn) == {"exact", own.spec, codes.spec, "PQ4x4fs"}
    assert drawn == _report.curves(report)
    own_pts = [
        (p["recall_1_at_1"], p["qps"]["32"]) for p in report["points"] if p["spec"] == own.spec
    ]
    for r, q in drawn[own.spec]:
        assert not any(r2 >= r and q2 >= q and (r2, q2) != (r, q) for r2, q2 in own_pts)
    rows = _report.table(report).splitlines()
    assert len(rows) == 2 + len(report["points"]) and "exact" in rows[2]


def test_hand_made_curves():
    """curves keeps per spec exactly the points no sibling beats; frontier lists the marked ones."""
    rep = _report_of(
        [
            ("exact", None, 1.0, 10, True),
            ("IVF", 1, 0.8, 900, True),
            ("IVF", 2, 0.8, 800, False),
            ("IVF", 4, 0.9, 500, True),
        ]
    )
    assert _report.curves(rep) == {"exact": [(1.0, 10)], "IVF": [(0.8, 900), (0.9, 500)]}
    assert _report.frontier(rep) == [(0.8, 900), (0.9, 500), (1.0, 10)]


def test_perturbed_queries_sit_at_nearest_neighbour_distance(rng):
    """Noise norm equals each vector's nearest-neighbour distance; cosine queries are unit."""
    xb = rng.standard_normal((400, 8)).astype(np.float32)
    q = perturbed_queries(xb, 50, "l2", seed=1)
    rows = np.random.default_rng(1).choice(400, 50, replace=False)
    d = brute_force(xb[rows], xb, 2, "l2")[0][:, 1]
    np.testing.assert_allclose(np.linalg.norm(q - xb[rows], axis=1), np.sqrt(d), rtol=1e-4)
    qc = perturbed_queries(xb, 20, "cosine")
    np.testing.assert_allclose(np.linalg.norm(qc, axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_perturbed_queries_of_a_bank_equal_those_of_its_rows(rng, metric):
    """From a bank (read at the sampled rows, searched under l2 whatever its metric) the
    queries are those of its live rows as a matrix."""
    xb = rng.standard_normal((400, 8)).astype(np.float32)
    bank = Bank(8, metric)
    bank.add(xb, np.arange(400) * 3)
    bank.remove([0, 3, 300])
    got = perturbed_queries(bank, 50, metric, seed=2)
    np.testing.assert_allclose(
        got, perturbed_queries(bank.vectors(), 50, metric, seed=2), rtol=1e-5
    )


def test_reservoir_is_bounded_and_uniform():
    """The sample never exceeds its size, keeps everything until full, and is uniform."""
    r = Reservoir(100, 1, seed=0)
    r.offer(np.arange(60).reshape(-1, 1))
    assert sorted(r.sample()[:, 0]) == list(range(60))
    counts = np.zeros(4)
    for seed in range(200):
        r = Reservoir(100, 1, seed=seed)
        for i0 in range(0, 4000, 333):
            r.offer(np.arange(i0, min(i0 + 333, 4000)).reshape(-1, 1))
        assert len(r.sample()) == 100 and r.seen == 4000
        counts += np.histogram(r.sample()[:, 0], bins=4, range=(0, 4000))[0]
    np.testing.assert_allclose(counts / 200, 25, atol=1.5)
