"""Homogeneous interest-graph adjacency for LightGCN-style propagation.

Node index space is ``[users | items | categories | brands]``; see :class:`NodeOffsets`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

# int32 sparse indices halve the adjacency's index memory and make torch.sparse.mm on CPU
# roughly twice as fast as int64 (measured at Gowalla size); int64 only when the graph needs it.
_INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class NodeOffsets:
    """Where each node type starts in the homogeneous index space."""

    num_users: int
    num_items: int
    num_categories: int
    num_brands: int

    @property
    def user(self) -> int:
        return 0

    @property
    def item(self) -> int:
        return self.num_users

    @property
    def category(self) -> int:
        return self.num_users + self.num_items

    @property
    def brand(self) -> int:
        return self.num_users + self.num_items + self.num_categories

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items + self.num_categories + self.num_brands


def node_offsets(num_users: int, num_items: int, num_categories: int = 0, num_brands: int = 0) -> NodeOffsets:
    return NodeOffsets(int(num_users), int(num_items), int(num_categories), int(num_brands))


def compress_interaction_weight(w: torch.Tensor) -> torch.Tensor:
    """log2(1 + w): a single interaction (w=1) weighs 1 like the unweighted and side-info edges,
    while heavy users/repeat purchases grow only logarithmically (w=3 -> 2, w=7 -> 3), so a few
    very active pairs cannot dominate a node's normalised neighbourhood."""
    return torch.log2(1.0 + w.clamp_min(0.0))


def _check_ids(name: str, ids: np.ndarray, upper: int) -> None:
    ids = np.asarray(ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= upper):
        raise ValueError(f"{name} ids must lie in [0, {upper}), got [{ids.min()}, {ids.max()}]")


def _relation_entries(off: NodeOffsets, ui_user: np.ndarray, ui_item: np.ndarray, relations: np.ndarray,
                      relation_weights: np.ndarray | None, exponent: float) -> torch.Tensor:
    """Each coalesced user-item pair's entry under per-relation normalisation, in the pairs' coalesced order."""
    counts = torch.as_tensor(np.asarray(relations), dtype=torch.float32)
    if counts.ndim != 2 or counts.shape[0] != len(ui_user):
        raise ValueError("relations must be [pairs, types]")
    weights = torch.ones(counts.shape[1]) if relation_weights is None else torch.as_tensor(
        np.asarray(relation_weights), dtype=torch.float32)
    index = torch.stack([torch.as_tensor(ui_user, dtype=torch.int64),
                         torch.as_tensor(ui_item, dtype=torch.int64)])
    merged = torch.sparse_coo_tensor(index, counts, (off.num_users, off.num_items, counts.shape[1]),
                                     check_invariants=False).coalesce()
    u, i = merged.indices()
    present = (merged.values() > 0).float()
    total = float((weights * (present.sum(0) > 0)).sum())
    entry = torch.zeros(len(u))
    for t in range(present.shape[1]):
        has = present[:, t]
        if total <= 0 or not bool(has.any()):
            continue
        du = torch.zeros(off.num_users).index_add_(0, u, has).pow_(-exponent)
        di = torch.zeros(off.num_items).index_add_(0, i, has).pow_(-exponent)
        entry += float(weights[t]) / total * has * torch.nan_to_num(du[u] * di[i], posinf=0.0)
    return entry


def build_norm_adjacency(
    num_users: int,
    num_items: int,
    num_categories: int,
    num_brands: int,
    ui_user: np.ndarray,
    ui_item: np.ndarray,
    ui_weight: np.ndarray | None,
    ic_item: np.ndarray,
    ic_cat: np.ndarray,
    ib_item: np.ndarray,
    ib_brand: np.ndarray,
    weighted: bool = True,
    exponent: float = 0.5,
    relations: np.ndarray | None = None,
    relation_weights: np.ndarray | None = None,
) -> torch.Tensor:
    """Symmetric D^-e A D^-e over [users | items | categories | brands] as a float32 sparse CSR; e = `exponent`,
    0.5 being LightGCN's D^-1/2 A D^-1/2. Below 0.5 a popular node's edges weigh more (SGFCF's generalised
    normalisation, Xia et al. KDD 2024).

    Duplicate pairs are merged before weighting: user-item weights are summed, compressed with
    :func:`compress_interaction_weight` and scaled to mean 1 over the pairs (``weighted``), or set to 1 (not
    ``weighted``); item-category and item-brand edges always weigh 1. Nodes without edges get an all-zero row.

    With `relations` (events by type per pair, [pairs, types]) each event type is a relation of its own: a pair's
    entry is sum_t w_t / W * [n_t > 0] * deg_t(u)^-e * deg_t(i)^-e, each relation normalised by its own degrees
    (a shopper's many views do not dilute their purchases), weighted by `relation_weights` w_t over their sum W
    among the types present; attribute edges are normalised as usual.
    No self-loops (LightGCN). Peak memory is a few tens of bytes per nonzero (one sort of the
    symmetric COO); nothing dense of size num_nodes^2 and no Python-level loops.
    """
    off = node_offsets(num_users, num_items, num_categories, num_brands)
    n = off.num_nodes
    _check_ids("ui_user", ui_user, num_users)
    _check_ids("ui_item", ui_item, num_items)
    _check_ids("ic_item", ic_item, num_items)
    _check_ids("ic_cat", ic_cat, num_categories)
    _check_ids("ib_item", ib_item, num_items)
    _check_ids("ib_brand", ib_brand, num_brands)
    if len(ui_user) != len(ui_item) or (ui_weight is not None and len(ui_weight) != len(ui_user)):
        raise ValueError("ui_user, ui_item and ui_weight must have the same length")
    if len(ic_item) != len(ic_cat) or len(ib_item) != len(ib_brand):
        raise ValueError("item-category / item-brand arrays must pair up")

    # Upper-triangle half only (every edge goes from a lower to a higher node-type block);
    # the mirror is added once, after merging duplicates, to keep A exactly symmetric.
    src = torch.cat(
        [
            torch.as_tensor(ui_user, dtype=torch.int64) + off.user,
            torch.as_tensor(ic_item, dtype=torch.int64) + off.item,
            torch.as_tensor(ib_item, dtype=torch.int64) + off.item,
        ]
    )
    dst = torch.cat(
        [
            torch.as_tensor(ui_item, dtype=torch.int64) + off.item,
            torch.as_tensor(ic_cat, dtype=torch.int64) + off.category,
            torch.as_tensor(ib_brand, dtype=torch.int64) + off.brand,
        ]
    )
    n_ui = len(ui_user)
    raw = torch.ones(src.numel(), dtype=torch.float32)
    if relations is not None:
        weighted = False  # every pair is one edge of the graph; its entry comes from its relations below
    if weighted and ui_weight is not None:
        raw[:n_ui] = torch.as_tensor(ui_weight, dtype=torch.float32)
    half = torch.sparse_coo_tensor(torch.stack([src, dst]), raw, (n, n), check_invariants=False).coalesce()
    del src, dst, raw
    hi, hj = half.indices()
    hv = half.values()
    # After coalescing, user-item pairs are exactly the entries whose row is a user.
    is_ui = hi < off.item
    if weighted and ui_weight is not None:
        hv = torch.where(is_ui, compress_interaction_weight(hv), torch.ones_like(hv))
        # Mean 1 over the pairs: the weights set how a shopper's pairs share their edges, not how much the
        # interactions outweigh the attribute edges (a log of one event type is then exactly the unweighted graph).
        ui_pos = is_ui & (hv > 0)
        if bool(ui_pos.any()):
            hv = torch.where(is_ui, hv / hv[ui_pos].mean(), hv)
    else:
        hv = torch.ones_like(hv)
    keep = hv > 0  # zero/negative interaction weights mean "no edge", not a zero-degree anchor
    if not bool(keep.all()):
        hi, hj, hv = hi[keep], hj[keep], hv[keep]
    n_pairs = int(is_ui.sum())  # coalesced user-item entries: the first ones (their rows are users)
    del half, is_ui, keep

    deg = torch.zeros(n, dtype=torch.float32)
    deg.index_add_(0, hi, hv)
    deg.index_add_(0, hj, hv)
    dinv = deg.pow_(-exponent)
    dinv[torch.isinf(dinv)] = 0.0
    hv = hv * dinv[hi] * dinv[hj]
    del dinv, deg
    if relations is not None:
        hv[:n_pairs] = _relation_entries(off, ui_user, ui_item, relations, relation_weights, exponent)
        keep = hv > 0
        if not bool(keep.all()):
            hi, hj, hv = hi[keep], hj[keep], hv[keep]

    rows = torch.cat([hi, hj])
    cols = torch.cat([hj, hi])
    vals = torch.cat([hv, hv])
    del hi, hj, hv
    counts = torch.bincount(rows, minlength=n)
    crow = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=crow[1:])
    del counts
    # Blocks are disjoint and the half has no diagonal, so there are no duplicates left: one sort
    # by (row, col) gives CSR order without paying for another coalesce.
    order = torch.argsort(rows * n + cols)
    del rows
    idx_dtype = torch.int32 if max(n, vals.numel()) <= _INT32_MAX else torch.int64
    cols = cols.to(idx_dtype)[order]
    vals = vals[order]
    del order
    with warnings.catch_warnings():
        # torch's "sparse CSR is beta" notice: CSR is the format torch.sparse.mm is fastest on.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(
            crow.to(idx_dtype),
            cols,
            vals,
            size=(n, n),
            dtype=torch.float32,
            check_invariants=False,
        )
