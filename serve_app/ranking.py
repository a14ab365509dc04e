"""A request's arithmetic, without Ray or HTTP: folding live events into a user's vector, and exact top-k with
exclusions and a category filter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
        for seen in (model.seen(row) if row is not None else None, extra_seen):
            if seen is not None and len(seen):
                scores[torch.from_numpy(seen.astype(np.int64))] = float("-inf")
    if cat_idx is not None:
        scores[torch.from_numpy(model.item_category != cat_idx)] = float("-inf")
    k = min(k, len(scores))
    vals, rows = torch.topk(scores, k)
    keep = torch.isfinite(vals)
    return rows[keep].tolist(), vals[keep].tolist()


def similar(model: ServingModel, row: int, k: int) -> tuple[list[int], list[float]]:
    """The k items nearest item `row` by cosine, itself excluded."""
    vec = model.items[row]
    norms = model.items.norm(dim=1).clamp_min(1e-12)
    scores = (model.items @ vec) / (norms * norms[row])
    scores[row] = float("-inf")
    vals, rows = torch.topk(scores, min(k, len(model.item_ids) - 1))
    return rows.tolist(), vals.tolist()
