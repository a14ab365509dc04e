"""Full-ranking Recall@K / NDCG@K (LightGCN-PyTorch definitions) with training items masked."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import numpy as np
import torch


class CsrLike(Protocol):
    indptr: np.ndarray
    indices: np.ndarray


def _gather_rows(indptr: np.ndarray, indices: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(batch row, item) of every stored entry of ``users``, vectorised over the batch."""
    starts = indptr[users]
    lens = indptr[users + 1] - starts
    total = int(lens.sum())
    batch_row = np.repeat(np.arange(len(users), dtype=np.int64), lens)
    # position = start of the entry's row + its rank within the row
    first = np.cumsum(lens) - lens
    pos = np.repeat(starts - first, lens) + np.arange(total, dtype=np.int64)
    return batch_row, np.asarray(indices, dtype=np.int64)[pos]


def _sum_recall_ndcg(hits: np.ndarray, n_test: np.ndarray, k: int) -> tuple[float, float]:
    """Sums over users of recall and NDCG, given hits[u, rank] (bool) and |test_u| (> 0)."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    recall = hits.sum(axis=1) / n_test
    dcg = (hits * discounts[: hits.shape[1]]).sum(axis=1)
    # Binary relevance: the ideal ranking puts min(|test|, K) hits first.
    idcg = np.cumsum(discounts)[np.minimum(n_test, k) - 1]
    return float(recall.sum()), float((dcg / idcg).sum())


def recall_ndcg_from_topk(topk_items: np.ndarray, test_sets: Sequence[Collection[int]]) -> dict[str, float]:
    """Reference version on plain Python sets, for hand-checkable tests and small evaluations.

    ``topk_items[u]`` is user u's ranked list (K = number of columns); users with an empty test
    set are skipped, as in the batched evaluator.
    """
    topk_items = np.asarray(topk_items)
    k = topk_items.shape[1]
    keep = [u for u, t in enumerate(test_sets) if len(t) > 0]
    hits = np.array([[int(i) in test_sets[u] for i in topk_items[u]] for u in keep], dtype=bool).reshape(-1, k)
    n_test = np.array([len(test_sets[u]) for u in keep], dtype=np.int64)
    r, n = _sum_recall_ndcg(hits, n_test, k) if keep else (0.0, 0.0)
    count = len(keep)
    return {f"recall@{k}": r / max(count, 1), f"ndcg@{k}": n / max(count, 1), "users": count}


# Scores held at once by an evaluation batch (float32: 512 MB): at a million items, 128 users a batch.
MAX_BATCH_SCORES = 1 << 27


@torch.no_grad()
def recall_ndcg_at_k(
    scores_fn: Callable[[torch.Tensor], torch.Tensor],
    train_csr: CsrLike,
    test_csr: CsrLike,
    k: int,
    batch_users: int = 1024,
) -> dict[str, float]:
    """Rank all items for every user with >= 1 test item; memory is O(batch_users x num_items).

    ``scores_fn(user_ids)`` returns float scores [batch, num_items] for local user ids. Training
    items are set to -inf before top-K. Metrics are averaged over evaluated users. Batches shrink so that one
    holds at most `MAX_BATCH_SCORES` scores.
    """
    test_indptr = np.asarray(test_csr.indptr, dtype=np.int64)
    train_indptr = np.asarray(train_csr.indptr, dtype=np.int64)
    n_test_all = np.diff(test_indptr)
    eval_users = np.flatnonzero(n_test_all > 0)
    recall_sum = ndcg_sum = 0.0
    if len(eval_users):  # one user's scores say how many items there are, hence how many users a batch holds
        num_items = scores_fn(torch.from_numpy(eval_users[:1])).shape[1]
        if k > num_items:
            raise ValueError(f"k={k} exceeds the number of items ({num_items})")
        batch_users = max(1, min(batch_users, MAX_BATCH_SCORES // max(num_items, 1)))
    for start in range(0, len(eval_users), batch_users):
        users = eval_users[start : start + batch_users]
        scores = scores_fn(torch.from_numpy(users)).float()
        num_items = scores.shape[1]
        # The train CSR may cover fewer users than the test one (cold users); eval_users is sorted,
        # so the covered users are a prefix of the batch and batch rows still line up.
        covered = users[users < len(train_indptr) - 1]
        rows, cols = _gather_rows(train_indptr, train_csr.indices, covered)
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = float("-inf")
        topk = torch.topk(scores, k, dim=1).indices
        del scores
        is_test = torch.zeros(len(users), num_items, dtype=torch.bool)
        trow, tcol = _gather_rows(test_indptr, test_csr.indices, users)
        is_test[torch.from_numpy(trow), torch.from_numpy(tcol)] = True
        hits = is_test.gather(1, topk).numpy()
        r, n = _sum_recall_ndcg(hits, n_test_all[users], k)
        recall_sum += r
        ndcg_sum += n
    count = len(eval_users)
    return {f"recall@{k}": recall_sum / max(count, 1), f"ndcg@{k}": ndcg_sum / max(count, 1), "users": count}
