"""Evaluation helpers compute what they claim, checked against independent computations."""

from __future__ import annotations

import time

import numpy as np

from vqsearch.index import (
    ground_truth,
    k_recall_at_k,
    knn,
    nearest_agreement,
    one_recall_at,
    time_search,
)


def test_recall_measures_on_hand_made_tables():
    """k-recall@k, 1-recall@r and code agreement match counts done by hand."""
    gt = np.array([[1, 2, 3], [4, 5, 6]])
    I = np.array([[3, 9, 1], [7, 8, 4]])
    assert k_recall_at_k(I, gt) == 3 / 6
    assert one_recall_at(I, gt, 1) == 0.0
    assert one_recall_at(I, gt, 3) == 1.0
    assert one_recall_at(I, gt, 2) == 0.0
    assert nearest_agreement(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])) == 0.5


def test_recall_of_a_search_against_itself_is_one(rng):
    """Exact search measured against its own ground truth has recall 1."""
    xb = rng.standard_normal((500, 8)).astype(np.float32)
    xq = rng.standard_normal((40, 8)).astype(np.float32)
    _, gt = ground_truth(xq, xb, 5)
    _, I = knn(xq, xb, 5)
    assert k_recall_at_k(I, gt) == 1.0 and one_recall_at(I, gt, 1) == 1.0


def test_time_search_reports_batches_and_latency():
    """Timing reports the batch size and a latency close to a known sleep."""
    seen = []

    def fake(batch):
        seen.append(len(batch))
        time.sleep(0.005)

    t = time_search(
        fake, np.zeros((100, 4), np.float32), batch_size=25, min_batches=6, min_seconds=0
    )
    assert t.batch_size == 25 and t.batches == 6 and seen == [25] * 7  # one warm-up
    assert 4.5 <= t.p50_ms <= 50 and t.p99_ms >= t.p50_ms
    assert 25 / 0.05 <= t.qps <= 25 / 0.0045
