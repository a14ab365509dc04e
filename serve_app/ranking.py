"""A request's arithmetic, without Ray or HTTP: folding live events into a user's vector, and top-k with
exclusions and a category filter, exactly or through the version's approximate index."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch

from serve_app.live_state import LiveEvent
from serve_app.model_store import ServingModel


def live_mean(model: ServingModel, rows: np.ndarray, events: Sequence[LiveEvent], event_weights: Mapping[str, float],
              half_life_s: float, now_ms: float) -> tuple[torch.Tensor, float]:
    """The weighted mean of the touched items' vectors (weight by event type, halved every `half_life_s`), and the
    events' total weight."""
    weights = np.array([event_weights.get(e.event, 1.0) * 0.5 ** (max(now_ms - e.ts_ms, 0.0) / 1000 / half_life_s)
                        for e in events], dtype=np.float32)
    total = float(weights.sum())
    return (torch.from_numpy(weights) @ model.items[torch.from_numpy(rows)]) / max(total, 1e-12), total


def blend(vector: torch.Tensor, mean: torch.Tensor, total: float, prior_weight: float, max_share: float
          ) -> torch.Tensor:
    """The trained vector and the live mean, the mean's share `total / (total + prior_weight)` (at most
    `max_share`), at the trained vector's length."""
    alpha = min(total / (total + prior_weight), max_share)
    scale = vector.norm() / mean.norm().clamp_min(1e-12)
    return (1 - alpha) * vector + alpha * scale * mean


def fold(model: ServingModel, vector: torch.Tensor | None, rows: np.ndarray, events: Sequence[LiveEvent],
         event_weights: Mapping[str, float], half_life_s: float, prior_weight: float, now_ms: float,
         max_share: float = 1.0) -> torch.Tensor:
    """The user's vector with their live events folded in: their live mean blended with the trained vector; without
    a trained vector, the mean alone.

    The live share never exceeds `max_share`: however many events arrive for a user, what the model learned of
    them keeps a part (a burst of posted events cannot take a known user's answers over entirely)."""
    mean, total = live_mean(model, rows, events, event_weights, half_life_s, now_ms)
    return mean if vector is None else blend(vector, mean, total, prior_weight, max_share)


def top_k(model: ServingModel, scores: torch.Tensor, row: int | None, k: int, exclude_seen: bool,
          cat_idx: int | None, extra_seen: np.ndarray | None = None) -> tuple[list[int], list[float]]:
    """Item rows and scores of the k best items; seen items (the model's and `extra_seen`) excluded when asked, only
    `cat_idx`'s items when given. Fewer than k when fewer qualify."""
    scores = scores.reshape(-1).clone()
    if exclude_seen:
        for seen in (model.excluded(row) if row is not None else None, extra_seen):
            if seen is not None and len(seen):
                scores[torch.from_numpy(seen.astype(np.int64))] = float("-inf")
    if cat_idx is not None:
        scores[torch.from_numpy(model.item_category != cat_idx)] = float("-inf")
    k = min(k, len(scores))
    vals, rows = torch.topk(scores, k)
    keep = torch.isfinite(vals)
    return rows[keep].tolist(), vals[keep].tolist()


def seen_live(rows: np.ndarray, events: Sequence[LiveEvent], seen_events: Collection[str]) -> np.ndarray:
    """The rows of the live events whose type makes their item seen (data.seen_events), as the model's evidence does:
    a live view of an item keeps it a candidate unless views count."""
    return rows[np.fromiter((e.event in seen_events for e in events), dtype=bool, count=len(events))]


def _excluded(model: ServingModel, row: int | None, extra_seen: np.ndarray | None) -> np.ndarray:
    parts = [p for p in (model.excluded(row) if row is not None else None, extra_seen) if p is not None and len(p)]
    return np.unique(np.concatenate(parts).astype(np.int64)) if parts else np.zeros(0, np.int64)


def top_k_indexed(model: ServingModel, vector: torch.Tensor, row: int | None, k: int, exclude_seen: bool,
                  cat_idx: int | None, extra_seen: np.ndarray | None, nprobe: int) -> tuple[list[int], list[float]]:
    """`top_k`'s answer through the approximate index: the same exclusions, filter and scores (dot products), with
    at least as many results as `top_k` would give.

    Seen items are excluded inside the search (a selector), so k results remain however many a user has seen;
    a category is scored exactly over its own items (cheaper than a filtered search, and exact). Should the search find
    fewer items than qualify, the request is scored exactly instead."""
    import faiss

    from registry.item_index import search_params

    excluded = _excluded(model, row, extra_seen) if exclude_seen else np.zeros(0, np.int64)
    if cat_idx is not None:
        rows = model.popular_by_category[model.category_ids[cat_idx]]
        rows = rows[~np.isin(rows, excluded)] if len(excluded) else rows
        scores = model.items[torch.from_numpy(rows.astype(np.int64))] @ vector
        vals, pos = torch.topk(scores, min(k, len(rows)))
        return rows[pos.numpy()].tolist(), vals.tolist()
    n = len(model.item_ids)
    k = min(k, n)
    params = search_params(model.index, nprobe, k)
    selectors = ()
    if len(excluded):
        inner = faiss.IDSelectorBatch(excluded)
        selectors = (inner, faiss.IDSelectorNot(inner))  # held until the search ends: faiss holds no reference
        params.sel = selectors[1]
    query = vector.detach().numpy().reshape(1, -1).astype(np.float32, copy=False)
    vals, rows = model.index.search(query, k, params=params)
    del selectors
    found = rows[0] >= 0
    if found.sum() < min(k, n - len(excluded)):
        return top_k(model, model.items @ vector, row, k, exclude_seen, None, extra_seen)
    return rows[0][found].tolist(), vals[0][found].tolist()


def similar(model: ServingModel, row: int, k: int) -> tuple[list[int], list[float]]:
    """The k items nearest item `row` by cosine, itself excluded."""
    norms = model.item_norms
    scores = (model.items @ model.items[row]) / (norms * norms[row])
    scores[row] = float("-inf")
    vals, rows = torch.topk(scores, min(k, len(model.item_ids) - 1))
    return rows.tolist(), vals.tolist()


def similar_indexed(model: ServingModel, row: int, k: int, nprobe: int) -> tuple[list[int], list[float]]:
    """`similar` through the index: the item's nearest by inner product (a wide candidate set), ranked by cosine."""
    from registry.item_index import search_params

    n = len(model.item_ids)
    fetch = min(n, max(10 * k, 200) + 1)  # wide: lengths skew inner-product neighbours away from cosine's
    params = search_params(model.index, nprobe, fetch)
    _, found = model.index.search(model.items[row].numpy().reshape(1, -1), fetch, params=params)
    cand = found[0][(found[0] >= 0) & (found[0] != row)]
    if len(cand) < min(k, n - 1):
        return similar(model, row, k)
    norms = model.item_norms
    idx = torch.from_numpy(cand.astype(np.int64))
    scores = (model.items[idx] @ model.items[row]) / (norms[idx] * norms[row])
    vals, pos = torch.topk(scores, min(k, len(cand)))
    return cand[pos.numpy()].tolist(), vals.tolist()
