"""Spectral initialisation: start the embedding table from the top singular vectors of the normalised graph.

LightGCN's propagation is a low-pass filter on the normalised user-item matrix; its top singular vectors are the
components that filter keeps (the GF-CF / SVD-GCN observation). Starting there instead of from noise gives BPR a
model that already ranks sensibly, which is what makes a CPU time budget enough. Two seconds at Gowalla size.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import svds

from trainers.graph import NodeOffsets


def spectral_embeddings(num_users: int, num_items: int, users: np.ndarray, items: np.ndarray,
                        ic_item: np.ndarray, ic_cat: np.ndarray, ib_item: np.ndarray, ib_brand: np.ndarray,
                        offsets: NodeOffsets, dim: int, std: float = 0.1, seed: int = 0) -> torch.Tensor:
    """[num_nodes, dim]: users and items from the SVD, categories and brands the mean of their items."""
    rng = np.random.default_rng(seed)
    out = rng.normal(0.0, std, size=(offsets.num_nodes, dim)).astype(np.float32)
    k = min(dim, num_users - 1, num_items - 1)
    if k < 1 or len(users) == 0:
        return torch.from_numpy(out)
    r = sp.csr_matrix((np.ones(len(users), np.float64), (users, items)), shape=(num_users, num_items))
    r.sum_duplicates()
    r.data[:] = 1.0
    du = np.maximum(np.asarray(r.sum(axis=1)).ravel(), 1.0)
    di = np.maximum(np.asarray(r.sum(axis=0)).ravel(), 1.0)
    rn = sp.diags(du**-0.5) @ r @ sp.diags(di**-0.5)
    u, sigma, vt = svds(rn, k=k, random_state=seed)
    scale = np.sqrt(np.maximum(sigma, 0.0))
    user_vec, item_vec = u * scale, vt.T * scale
    # Same overall spread as the default initialisation, so learning rates keep their meaning.
    factor = std / max(float(np.concatenate([user_vec, item_vec]).std()), 1e-12)
    out[offsets.user : offsets.user + num_users, :k] = user_vec * factor
    out[offsets.item : offsets.item + num_items, :k] = item_vec * factor
    if k < dim:
        out[offsets.user : offsets.item + num_items, k:] *= 0.1
    for base, count, member_item, member in ((offsets.category, offsets.brand - offsets.category, ic_item, ic_cat),
                                             (offsets.brand, offsets.num_nodes - offsets.brand, ib_item, ib_brand)):
        if count and len(member):
            sums = np.zeros((count, dim))
            np.add.at(sums, member, out[offsets.item + member_item])
            n = np.bincount(member, minlength=count)[:, None]
            has = n[:, 0] > 0
            out[base : base + count][has] = (sums[has] / n[has]).astype(np.float32)
    return torch.from_numpy(out)
