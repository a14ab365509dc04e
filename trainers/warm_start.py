"""Warm starts: grow a published model to a graph that gained nodes, and choose what a cycle trains on.

Id maps are append-only, so an old node keeps its index within its type; only the offsets of the types in the
homogeneous table move. Old nodes keep their learned vectors. New nodes start where the graph says they belong:
a new category or brand at the mean of its known items, a new item at the mean of its categories and brands (the
item mean when it has none), a new user at the mean of the items they touched.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from core.config import AppConfig
from trainers.data import InterestGraph, Split, parent_holdout
from trainers.graph import NodeOffsets, node_offsets
from trainers.loop import passes_to_steps
from trainers.sampling import with_replay

TYPES = ("user", "item", "category", "brand")


def _counts(graph: InterestGraph) -> dict[str, int]:
    return {"user": graph.num_users, "item": graph.num_items, "category": graph.num_categories,
            "brand": graph.num_brands}


def _offsets(counts: dict[str, int]) -> NodeOffsets:
    return node_offsets(counts["user"], counts["item"], counts["category"], counts["brand"])


def _fresh_means(values: np.ndarray, groups: np.ndarray, members: np.ndarray, first: int, last: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Mean of values[members] per group in [first, last), and which of those groups had any member. A sparse
    product, not np.add.at: add.at is unbuffered, and a day's pairs at 1,024 dims made it the bulk of a cycle's
    preparation."""
    keep = (groups >= first) & (groups < last)
    groups, members = groups[keep] - first, members[keep]
    n = np.bincount(groups, minlength=last - first)
    member_of = sp.csr_matrix((np.ones(len(groups), dtype=np.float32), (groups, members)),
                              shape=(last - first, len(values)))
    sums = np.asarray(member_of @ values, dtype=np.float32)
    has = n > 0
    sums[has] /= n[has, None]
    return sums, has


def extend_embeddings(old: np.ndarray, old_counts: dict[str, int], graph: InterestGraph,
                      train_user: np.ndarray, train_item: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The ego embedding table for `graph`, keeping every old node's row; written into `out` where given (a
    worker's model table, float32 [nodes, dim])."""
    new_counts = _counts(graph)
    for t in TYPES:
        if new_counts[t] < old_counts[t]:
            raise ValueError(f"the graph has fewer {t} nodes ({new_counts[t]}) than the parent ({old_counts[t]})")
    o_off, n_off = _offsets(old_counts), _offsets(new_counts)
    dim = old.shape[1]
    # One table, each type's block a view into it: at 1,024 dims every extra copy of the table was a tenth of a
    # second or more of a cycle's preparation.
    if out is None:
        out = np.empty((n_off.num_nodes, dim), dtype=np.float32)
    elif out.shape != (n_off.num_nodes, dim) or out.dtype != np.float32:
        raise ValueError(f"the table to grow into is {out.dtype} {out.shape}, not float32 {(n_off.num_nodes, dim)}")
    blocks: dict[str, np.ndarray] = {}
    for t in TYPES:
        block = out[getattr(n_off, t) : getattr(n_off, t) + new_counts[t]]
        start = getattr(o_off, t)
        block[: old_counts[t]] = old[start : start + old_counts[t]]
        block[old_counts[t] :] = 0.0  # every new row is filled below; zeros rather than stale memory if not
        blocks[t] = block
    n_old_items = old_counts["item"]
    item_mean = blocks["item"][:n_old_items].mean(axis=0) if n_old_items else np.zeros(dim, np.float32)

    # New categories and brands: the mean of their items that already have vectors.
    for t, items, groups in (("category", graph.ic_item, graph.ic_cat), ("brand", graph.ib_item, graph.ib_brand)):
        if new_counts[t] > old_counts[t]:
            known = items < n_old_items
            means, has = _fresh_means(blocks["item"], groups[known], items[known], old_counts[t], new_counts[t])
            blocks[t][old_counts[t]:] = np.where(has[:, None], means, item_mean)

    # New items: the mean of their category and brand vectors.
    if new_counts["item"] > n_old_items:
        attributes = np.concatenate([blocks["category"], blocks["brand"]])
        means, has = _fresh_means(attributes, np.concatenate([graph.ic_item, graph.ib_item]),
                                  np.concatenate([graph.ic_cat, new_counts["category"] + graph.ib_brand]),
                                  n_old_items, new_counts["item"])
        blocks["item"][n_old_items:] = np.where(has[:, None], means, item_mean)

    # New users: the mean of the items they touched.
    if new_counts["user"] > old_counts["user"]:
        means, has = _fresh_means(blocks["item"], train_user, train_item, old_counts["user"], new_counts["user"])
        blocks["user"][old_counts["user"]:] = np.where(has[:, None], means, item_mean)
    return out


def extended_state(parent_state: dict, old_counts: dict[str, int], graph: InterestGraph, train_user: np.ndarray,
                   train_item: np.ndarray) -> dict[str, torch.Tensor]:
    """A state dict for InterestGCN over `graph`, grown from the parent's; it shares no memory with `parent_state`
    (which may map the parent's file)."""
    old = parent_state["embedding.weight"].detach().cpu().numpy()
    grown = extend_embeddings(old, old_counts, graph, train_user, train_item)
    rest = {name: value.clone() for name, value in parent_state.items() if name != "embedding.weight"}
    return {**rest, "embedding.weight": torch.from_numpy(grown)}


def touched_rows(graph: InterestGraph, train_user: np.ndarray, train_item: np.ndarray, pair_index: np.ndarray,
                 new_pairs: int, old_counts: dict[str, int]) -> np.ndarray:
    """Bool per node of the grown table, the rows a small cycle moves (update.touched_only_below): the nodes new
    since the parent and both ends of every new pair. `pair_index` holds the new pairs first (`update_pair_index`),
    the replayed ones after."""
    counts = _counts(graph)
    off = _offsets(counts)
    mask = np.zeros(off.num_nodes, dtype=bool)
    new = np.asarray(pair_index[:new_pairs], dtype=np.int64)
    mask[off.user + train_user[new].astype(np.int64)] = True
    mask[off.item + train_item[new].astype(np.int64)] = True
    for t in TYPES:
        start = getattr(off, t)
        mask[start + old_counts[t] : start + counts[t]] = True
    return mask


def update_steps(cfg: AppConfig, world: int, pairs: int) -> int:
    """Optimiser steps of a cycle: `update.epochs` passes over its pairs (new + replay), at most update.max_steps.

    The work follows what is new, as a retrain's follows all the data: a quiet hour costs a few steps, and a
    small slice is not passed over dozens of times (which overfits it and fails the gate).
    """
    return passes_to_steps(pairs, world, cfg.train.batch_size, cfg.update.epochs, cfg.update.max_steps)


def update_pair_index(graph: InterestGraph, sp: Split, cfg: AppConfig, parent_watermark_ms: int,
                      parent_runs: int | None = None, parent_learned_holdout: bool = False
                      ) -> tuple[np.ndarray, int]:
    """Training pairs of a warm start, as indices into the split's training pairs: every pair the parent did not
    learn from (one that got an event in an ingestion run after the parent's, or held out by its split) plus
    `update.replay_ratio` older pairs per new one, so the model does not forget the rest of the graph.

    "After the parent" is by arrival, so a late event (an old timestamp ingested now) is learned as new. A parent
    or a graph from before arrival was recorded falls back to event time against the parent's watermark. A parent
    that learned its holdout after evaluation (train.refit) held nothing out. Returns the indices and how many of
    them are new (none: nothing to learn)."""
    held = (np.zeros(len(graph.ui_user), dtype=bool) if parent_learned_holdout
            else parent_holdout(graph, cfg.train.holdout, cfg.train.holdout_days, parent_watermark_ms))
    in_train = ~sp.test_mask
    if parent_runs is not None and graph.ui_last_run is not None:
        arrived = graph.ui_last_run > parent_runs
    else:
        arrived = graph.ui_last_ts > parent_watermark_ms
    fresh_edges = arrived | held
    fresh = fresh_edges[in_train]
    new_idx = np.flatnonzero(fresh)
    rng = np.random.default_rng(cfg.train.seed)
    picked = with_replay(new_idx, np.flatnonzero(~fresh), cfg.update.replay_ratio, rng)
    return picked, len(new_idx)
