"""Reference rankers measured on the same holdout as the model: the figure a trained model has to beat."""

from __future__ import annotations

import numpy as np
import torch

from trainers.data import InterestGraph, Split, evaluated_pairs
from trainers.metrics import recall_ndcg_at_k
from trainers.sampling import csr_from_pairs

# Users ranked at once (whatever batch the caller asks for). Every batch is a fresh [users, items] table of the same
# scores; small ones are reused by the allocator where large ones are mapped and faulted in anew (759 Taobao users
# at once: 0.37 s of an update cycle's publish). Each user's ranking is its own row's, so the figures do not depend
# on it beyond the rounding of their sums.
POPULARITY_BATCH_USERS = 64


def popularity_metrics(graph: InterestGraph, sp: Split, k: int, batch_users: int = 1024,
                       max_users: int | None = None, seed: int = 0) -> dict[str, float]:
    """Recall/NDCG@K of ranking every user's unseen items by training-pair popularity, on the users the model's
    evaluation scores (`max_users`, `seed`: `data.evaluated_pairs`); at most POPULARITY_BATCH_USERS at a time."""
    counts = np.bincount(sp.train_item, minlength=graph.num_items).astype(np.float32)
    scores = torch.from_numpy(counts)
    train = csr_from_pairs(sp.train_user, sp.train_item, graph.num_users, graph.num_items)
    test = csr_from_pairs(*evaluated_pairs(sp, max_users, seed), graph.num_users, graph.num_items)
    k_eff = min(k, graph.num_items)
    out = recall_ndcg_at_k(lambda b: scores.expand(len(b), -1).clone(), train, test, k_eff,
                           min(batch_users, POPULARITY_BATCH_USERS))
    return {f"recall@{k}": out[f"recall@{k_eff}"], f"ndcg@{k}": out[f"ndcg@{k_eff}"]}
