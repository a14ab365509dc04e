"""Precomputed answers: each known user's best items of one version, seen items excluded, computed by a replica in
the background after it swaps the version in.

It is a cache of the replica's scoring, not a second model: the same vectors, the same exclusions, the same order
(ties aside), so an answer taken from it equals what `ranking.top_k` returns for the same user, or for a catalogue
answered through its approximate index what `ranking.top_k_indexed` finds (`precompute_indexed`). A request uses
it only when nothing else applies: a known user without live events the version does not cover, no category
filter, seen items excluded, no explanation asked, and `k` within `serve.precompute_depth`; anything else is
scored per request. Requests are scored per request while it is being computed, so a swap is never delayed by it.

Cost: users x items x dimensions multiply-adds once per version, in blocks of users (Gowalla's 29,858 x 40,981 x
64: a few seconds on one core), or through the index one search per user (about 2 ms at 1M items; users in
batches over faiss's threads), and users x depth x 8 bytes of memory (1M users at depth 50: 400 MB). Past
`serve.precompute_max_users` it is not computed, and every request is scored exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from serve_app.model_store import ServingModel

BLOCK_USERS = 1024  # a block's scores are BLOCK_USERS x items float32 (41k items: 168 MB)


@dataclass(frozen=True)
class Answers:
    version: str
    rows: np.ndarray  # int32 [users, depth]: item rows, best first; -1 past the items a user can be shown
    scores: np.ndarray  # float32 [users, depth]

    @property
    def depth(self) -> int:
        return self.rows.shape[1]

    def top(self, row: int, k: int) -> tuple[list[int], np.ndarray]:
        rows, scores = self.rows[row, :k], self.scores[row, :k]
        if len(rows) and rows[-1] < 0:  # fewer than k items this user may be shown (-1 pads the end)
            keep = rows >= 0
            rows, scores = rows[keep], scores[keep]
        return rows.tolist(), scores


def _by_blocks(model: ServingModel, depth: int, cancelled: threading.Event | None,
               fill: Callable[[int, int, np.ndarray, np.ndarray], None]) -> Answers | None:
    """The answers table of `model`, `fill(start, end, rows, scores)` writing each block of users' rows into it."""
    n_users = model.users.shape[0]
    out_rows = np.full((n_users, depth), -1, np.int32)
    out_scores = np.zeros((n_users, depth), np.float32)
    for start in range(0, n_users, BLOCK_USERS):
        if cancelled is not None and cancelled.is_set():
            return None
        end = min(start + BLOCK_USERS, n_users)
        fill(start, end, out_rows[start:end], out_scores[start:end])
    return Answers(model.version, out_rows, out_scores)


def precompute(model: ServingModel, depth: int, cancelled: threading.Event | None = None) -> Answers | None:
    """Every user's best `depth` items of `model`, seen items excluded; None when cancelled (a newer version)."""
    users, items = model.users, model.items
    depth = min(depth, items.shape[0])
    indptr, indices = model.excluded_indptr, model.excluded_indices

    def fill(start: int, end: int, out_rows: np.ndarray, out_scores: np.ndarray) -> None:
        scores = users[start:end] @ items.T
        counts = np.diff(indptr[start : end + 1])
        if counts.sum():
            owner = torch.from_numpy(np.repeat(np.arange(end - start), counts))
            seen = torch.from_numpy(indices[indptr[start] : indptr[end]].astype(np.int64))
            scores[owner, seen] = float("-inf")
        vals, rows = torch.topk(scores, depth, dim=1)
        rows = rows.to(torch.int32)
        rows[~torch.isfinite(vals)] = -1
        out_rows[:] = rows.numpy()
        out_scores[:] = vals.numpy()

    return _by_blocks(model, depth, cancelled, fill)


SEEN_MARGIN = 128  # extra neighbours fetched per user in a batched search, so `depth` remain once seen items go


def precompute_indexed(model: ServingModel, depth: int, nprobe: int, cancelled: threading.Event | None = None
                       ) -> Answers | None:
    """`precompute` through the version's index: each user's best `depth` items the index finds, seen items
    excluded. Users are searched in batches (faiss spreads a batch over its threads) fetching `depth` plus their
    block's largest seen count (at most SEEN_MARGIN more); a user with still fewer than `depth` left is searched
    again on their own with their seen items excluded inside the search, as a request is (`ranking.top_k_indexed`).
    An inverted file scans the same lists either way, so the answers are the ones requests would get."""
    from registry.item_index import search_params
    from serve_app.ranking import top_k_indexed

    users, index = model.users.numpy(), model.index
    n_items = len(model.item_ids)
    depth = min(depth, n_items)
    indptr, indices = model.excluded_indptr, model.excluded_indices

    def fill(start: int, end: int, out_rows: np.ndarray, out_scores: np.ndarray) -> None:
        counts = np.diff(indptr[start : end + 1])
        fetch = min(n_items, depth + min(int(counts.max(initial=0)), SEEN_MARGIN))
        params = search_params(index, nprobe, fetch)
        vals, rows = index.search(np.ascontiguousarray(users[start:end]), fetch, params=params)
        for i in range(end - start):
            row = start + i
            seen = indices[indptr[row] : indptr[row + 1]]
            keep = rows[i] >= 0
            if len(seen):
                keep &= ~np.isin(rows[i], seen)
            got_rows, got_vals = rows[i][keep][:depth], vals[i][keep][:depth]
            if len(got_rows) < min(depth, n_items - len(seen)):  # many seen near the top: search without them
                walked, walked_vals = top_k_indexed(model, model.users[row], row, depth, True, None, None, nprobe)
                got_rows, got_vals = np.asarray(walked, np.int64), np.asarray(walked_vals, np.float32)
            out_rows[i, : len(got_rows)] = got_rows
            out_scores[i, : len(got_rows)] = got_vals

    return _by_blocks(model, depth, cancelled, fill)
