"""The GF-CF baseline computes the paper's formula: checked against a dense computation on a small matrix."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from bench.gfcf import GFCF, gfcf_metrics


def _interactions(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((40, 30)) < 0.2).astype(np.float32)
    dense[0, :] = 0  # a user with no training items
    dense[:, 5] = 0  # an item nobody touched
    dense[1, 3] = 3.0  # repeated interactions count once
    return sp.csr_matrix(dense)


def test_scores_follow_the_linear_plus_ideal_low_pass_formula() -> None:
    r = _interactions()
    model = GFCF(r, rank=8, alpha=0.3)
    binary = (r.toarray() > 0).astype(np.float64)
    du, di = binary.sum(1), binary.sum(0)
    inv = lambda d: np.where(d > 0, 1 / np.sqrt(np.maximum(d, 1e-12)), 0.0)  # noqa: E731
    norm = inv(du)[:, None] * binary * inv(di)[None, :]
    v = np.linalg.svd(norm)[2][:8].T
    expected = binary @ norm.T @ norm + 0.3 * binary @ (inv(di)[:, None] * v) @ (np.sqrt(di)[:, None] * v).T
    got = model.scores(torch.arange(40)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert np.all(got[0] == 0)  # nothing known about the user: no preference


def test_metrics_mask_training_items_and_report_the_filter() -> None:
    r = _interactions(1)
    rng = np.random.default_rng(2)
    test = sp.csr_matrix((rng.random(r.shape) < 0.05).astype(np.float32) * (r.toarray() == 0))
    out = gfcf_metrics(r, test, k=5, rank=8)
    assert out["ranker"].startswith("GF-CF") and 0.0 <= out["recall@5"] <= 1.0 and 0.0 <= out["ndcg@5"] <= 1.0
