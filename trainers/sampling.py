"""Vectorised BPR sampling: exact uniform negatives and shuffled (user, pos, neg) batches.

Item ids here are local (0..num_items-1); callers add the item offset of the node space.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch


class Csr(NamedTuple):
    """User -> items adjacency: items of user u are ``indices[indptr[u]:indptr[u+1]]``.

    scipy.sparse.csr_matrix has the same two attributes and is accepted wherever this is.
    """

    indptr: np.ndarray
    indices: np.ndarray


def csr_from_pairs(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> Csr:
    """Deduplicated CSR with each row's items sorted ascending."""
    keys = np.unique(np.asarray(users, dtype=np.int64) * num_items + np.asarray(items, dtype=np.int64))
    rows = keys // num_items
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=num_users), out=indptr[1:])
    return Csr(indptr, keys - rows * num_items)


class NegativeSampler:
    """Uniform negatives over each user's non-positive items, exact and loop-free.

    Instead of rejection sampling (which needs ~num_items rounds for a user owning all but one
    item) the sampler draws a rank r uniformly among the user's ``num_items - deg`` non-positives
    and maps it to the item directly: with the user's sorted positives p_0 < p_1 < ..., the r-th
    non-positive is ``r + #{k : p_k - k <= r}``, and ``p_k - k`` is non-decreasing, so one
    ``np.searchsorted`` over all users' shifted keys answers a whole batch.
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, num_items: int) -> None:
        indptr = np.asarray(indptr, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64)
        num_users = len(indptr) - 1
        if indices.size and (indices.min() < 0 or indices.max() >= num_items):
            raise ValueError(f"positive item ids must lie in [0, {num_items})")
        rows = np.repeat(np.arange(num_users, dtype=np.int64), np.diff(indptr))
        # Re-normalise (sort + dedupe) so a slightly unsorted or duplicated input cannot skew ranks.
        csr = csr_from_pairs(rows, indices, num_users, num_items)
        del rows
        self.num_users = num_users
        self.num_items = int(num_items)
        self.indptr = csr.indptr
        self.degree = np.diff(csr.indptr)
        rows = np.repeat(np.arange(num_users, dtype=np.int64), self.degree)
        rank_in_row = np.arange(csr.indices.size, dtype=np.int64) - self.indptr[rows]
        # Stride num_items + 1 because p_k - k can equal num_items - deg <= num_items.
        self._stride = self.num_items + 1
        self._shifted = rows * self._stride + (csr.indices - rank_in_row)

    def sample(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One negative item per entry of ``users`` (int64 array of the same shape)."""
        users = np.asarray(users, dtype=np.int64)
        free = self.num_items - self.degree[users]
        if users.size and free.min() <= 0:
            bad = users[free <= 0][:5]
            raise ValueError(f"users {bad.tolist()} have every item as a positive: no negative exists")
        r = rng.integers(0, free)
        below = np.searchsorted(self._shifted, users * self._stride + r, side="right") - self.indptr[users]
        return r + below


def iter_bpr_batches(
    pairs_user: np.ndarray,
    pairs_item: np.ndarray,
    sampler: NegativeSampler,
    batch_size: int,
    rng: np.random.Generator,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch: shuffled positive pairs in batches of (users, pos_items, neg_items) LongTensors.

    Negatives are drawn per batch rather than per epoch so that memory stays O(batch_size).
    """
    pairs_user = np.asarray(pairs_user, dtype=np.int64)
    pairs_item = np.asarray(pairs_item, dtype=np.int64)
    n = len(pairs_user)
    perm = rng.permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        sel = perm[start : start + batch_size]
        users = pairs_user[sel]
        yield (
            torch.from_numpy(users),
            torch.from_numpy(pairs_item[sel]),
            torch.from_numpy(sampler.sample(users, rng)),
        )


def with_replay(new_idx: np.ndarray, old_idx: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """`new_idx` followed by `ratio` of `old_idx` per new one, drawn without replacement (at most all of them): what
    a warm start or a refit trains on, so the model does not forget the rest of the graph."""
    n_replay = min(len(old_idx), int(round(ratio * max(len(new_idx), 1))))
    replay = rng.choice(old_idx, size=n_replay, replace=False) if n_replay else old_idx[:0]
    return np.concatenate([new_idx, replay])
