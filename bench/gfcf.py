"""GF-CF (Shen et al., CIKM 2021, arXiv 2108.07567): the training-free graph filter our model is measured against.

score(u) = r_u R~^T R~ + alpha * r_u D_I^-1/2 V V^T D_I^1/2, with r_u the user's binary training row,
R~ = D_U^-1/2 R D_I^-1/2 (degree-normalised interactions) and V the top `rank` right singular vectors of R~: a
linear low-pass filter over the item-item graph plus the ideal low-pass filter. The paper's Gowalla settings are
rank 256 and alpha 0.3 (published Recall@20 0.1849, NDCG@20 0.1518).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import svds

from trainers.metrics import recall_ndcg_at_k


class GFCF:
    """The filter fitted to a binary user x item matrix; `scores(users)` is dense [len(users), items]."""

    def __init__(self, interactions: sp.csr_matrix, rank: int = 256, alpha: float = 0.3, seed: int = 0) -> None:
        r = interactions.tocsr().astype(np.float64)
        r.data[:] = 1.0  # the filter reads who touched what, not how often
        user_deg = np.asarray(r.sum(axis=1)).ravel()
        item_deg = np.asarray(r.sum(axis=0)).ravel()
        inv_sqrt = lambda d: np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1e-12)), 0.0)  # noqa: E731
        norm = sp.diags(inv_sqrt(user_deg)) @ r @ sp.diags(inv_sqrt(item_deg))
        self.binary = r.astype(np.float32).tocsr()
        self.norm = norm.astype(np.float32).tocsr()
        self.norm_t = self.norm.T.tocsr()
        rank = min(rank, min(r.shape) - 1)
        # ARPACK, deterministic for a fixed start vector: the exact top singular vectors the paper uses.
        v0 = np.random.default_rng(seed).standard_normal(min(r.shape))
        _, _, vt = svds(norm, k=rank, v0=v0)
        v = vt.T.astype(np.float32)
        self.left = torch.from_numpy(v * inv_sqrt(item_deg).astype(np.float32)[:, None])  # D_I^-1/2 V
        self.right = torch.from_numpy(v * np.sqrt(item_deg).astype(np.float32)[:, None])  # D_I^1/2 V
        self.alpha = alpha

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        rows = self.binary[users.numpy()]
        linear = torch.from_numpy(np.asarray(((rows @ self.norm_t) @ self.norm).todense(), dtype=np.float32))
        ideal = torch.from_numpy(np.asarray(rows @ self.left.numpy(), dtype=np.float32)) @ self.right.T
        return linear + self.alpha * ideal


def gfcf_metrics(train: sp.csr_matrix, test: sp.csr_matrix, k: int = 20, rank: int = 256, alpha: float = 0.3,
                 batch_users: int = 1024) -> dict:
    """Fit GF-CF on the training pairs and score every user's unseen items by the project's metric code."""
    started = time.perf_counter()
    model = GFCF(train, rank=rank, alpha=alpha)
    fit_s = time.perf_counter() - started
    m = recall_ndcg_at_k(model.scores, train, test, k, batch_users)
    return {"ranker": f"GF-CF (rank {rank}, alpha {alpha})", "seconds": round(fit_s, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            f"recall@{k}": m[f"recall@{k}"], f"ndcg@{k}": m[f"ndcg@{k}"]}
