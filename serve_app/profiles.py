"""Interest profiles and explanations: the interest graph made visible, from the same version and live state that
recommendations use (pure functions; the app calls them per request).

A profile sums, per category and per brand, the evidence behind a shopper's items: the version's (each seen item's
decayed weight, its weight with a short half-life, its events by type, when it was last touched) and their live
events the version does not cover yet. Latent interests are the categories and brands they have not touched whose
vectors the model rates highest for theirs.

An explanation says which of the shopper's items a recommendation owes most to. Scores are dot products, and the
shopper's vector is a function of their evidence: the trained vector decomposed as `r + sum_j c_j v_j` over their
history items (least squares; `r` is what the items do not span), blended with the live fold. An item's
contribution is how much the score falls when that item is taken out of the evidence, everything else unchanged:
exact, so the explanation is faithful by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.config import EventName
from serve_app.live_state import LiveEvent
from serve_app.model_store import ServingModel
from serve_app.ranking import fold

EVENTS: tuple[str, ...] = EventName.__args__  # the evidence's event order (datasets.schema.EVENT_TYPES)
RISING, FADING = 1.25, 0.8  # recent share over long share beyond these: "rising" / "fading"


@dataclass(frozen=True)
class Evidence:
    """One shopper's evidence, item by item: rows into the version's items."""

    rows: np.ndarray  # int64 item rows
    weight: np.ndarray  # float64: decayed with data.half_life_days (live: the event's weight, fresh)
    weight_recent: np.ndarray  # float64: decayed with data.recent_half_life_days
    counts: np.ndarray  # int64 [n, 5]: events by type
    last_ms: np.ndarray  # int64
    live: np.ndarray  # bool: from live events (not yet in the version)


def evidence(model: ServingModel, row: int | None, live: Sequence[LiveEvent], event_weights: Mapping[str, float]
             ) -> Evidence:
    """The version's evidence for user `row` (none for a user it does not know) and their uncovered live events."""
    parts = []
    ev = model.seen_evidence
    if row is not None:
        lo, hi = model.seen_indptr[row], model.seen_indptr[row + 1]
        rows = model.seen_indices[lo:hi].astype(np.int64)
        if ev is not None:
            parts.append((rows, ev["weight"][lo:hi].astype(np.float64), ev["weight_recent"][lo:hi].astype(np.float64),
                          ev["counts"][lo:hi].astype(np.int64), ev["last_ts"][lo:hi].astype(np.int64),
                          np.zeros(hi - lo, bool)))
        else:  # a version without evidence: every seen item once, alike
            n = hi - lo
            parts.append((rows, np.ones(n), np.ones(n), np.zeros((n, len(EVENTS)), np.int64),
                          np.full(n, model.watermark_ms, np.int64), np.zeros(n, bool)))
    known = [e for e in live if e.item_id in model.item_row]
    if known:
        n = len(known)
        counts = np.zeros((n, len(EVENTS)), np.int64)
        for i, e in enumerate(known):
            if e.event in EVENTS:
                counts[i, EVENTS.index(e.event)] = 1
        w = np.array([event_weights.get(e.event, 1.0) for e in known])
        parts.append((np.array([model.item_row[e.item_id] for e in known], np.int64), w, w, counts,
                      np.array([e.ts_ms for e in known], np.int64), np.ones(n, bool)))
    if not parts:
        return Evidence(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros((0, len(EVENTS)), np.int64),
                        np.zeros(0, np.int64), np.zeros(0, bool))
    return Evidence(*(np.concatenate(x) for x in zip(*parts, strict=True)))


def _interests(ev: Evidence, of_item: np.ndarray, names: Sequence[str], kind: str, k: int) -> list[dict]:
    groups = of_item[ev.rows]
    has = groups >= 0
    if not has.any():
        return []
    g, w, wr = groups[has], ev.weight[has], ev.weight_recent[has]
    n = len(names)
    weight = np.bincount(g, weights=w, minlength=n)
    recent = np.bincount(g, weights=wr, minlength=n)
    counts = np.zeros((n, len(EVENTS)), np.int64)
    np.add.at(counts, g, ev.counts[has])
    last = np.full(n, -1, np.int64)
    np.maximum.at(last, g, ev.last_ms[has])
    live = np.bincount(g, weights=ev.live[has].astype(float), minlength=n)
    total, total_recent = weight.sum(), recent.sum()
    out = []
    for c in np.argsort(-weight, kind="stable")[:k]:
        if weight[c] <= 0:
            break
        share = weight[c] / total
        ratio = (recent[c] / total_recent) / share if total_recent > 0 else 1.0
        trend = "rising" if ratio > RISING else "fading" if ratio < FADING else "steady"
        out.append({kind: names[c], "weight": round(float(share), 4), "trend": trend,
                    "events": {e: int(counts[c, i]) for i, e in enumerate(EVENTS) if counts[c, i]},
                    "last_seen_ms": int(last[c]), "live_events": int(live[c])})
    return out


def _latent(vector: torch.Tensor | None, vectors: np.ndarray | None, names: Sequence[str], touched: set[int],
            kind: str, k: int) -> list[dict]:
    """The k untouched categories (brands) the model rates highest for this vector: the dot product, the score the
    recommender itself ranks by (cosine, which ignores a category's learned weight, found a tenth as many of the
    categories shoppers went on to engage with: bench.interests)."""
    if vector is None or vectors is None or not len(names):
        return []
    v = vector.detach().cpu().numpy().astype(np.float64)
    score = vectors.astype(np.float64) @ v
    score[list(touched)] = -np.inf
    score[np.linalg.norm(vectors, axis=1) == 0] = -np.inf  # no vector learned (a format-1 version, a new node)
    out = []
    for c in np.argsort(-score, kind="stable")[:k]:
        if not np.isfinite(score[c]):
            break
        out.append({kind: names[c], "score": round(float(score[c]), 4)})
    return out


def profile(model: ServingModel, ev: Evidence, vector: torch.Tensor | None, k: int) -> dict:
    """Top-k categories and brands by evidence (weight = share of the shopper's total), their trend, and the k
    untouched categories and brands nearest the shopper's vector."""
    categories = _interests(ev, model.item_category, model.category_ids, "category", k)
    brands = _interests(ev, model.item_brand, model.brand_ids, "brand", k)
    touched_c = {int(c) for c in model.item_category[ev.rows] if c >= 0}
    touched_b = {int(b) for b in model.item_brand[ev.rows] if b >= 0}
    return {"categories": categories, "brands": brands,
            "latent": {"categories": _latent(vector, model.category_vectors, model.category_ids, touched_c,
                                             "category", k),
                       "brands": _latent(vector, model.brand_vectors, model.brand_ids, touched_b, "brand", k)},
            "evidence": {"items": int(len(ev.rows)), "live_events": int(ev.live.sum())}}


@dataclass(frozen=True)
class Explainer:
    """How one shopper's vector is made of their evidence, so each item's part in a score can be taken out."""

    history_rows: np.ndarray  # item rows of the trained vector's decomposition
    coef: np.ndarray  # c_j: trained vector = residual + sum_j c_j v_j (least squares over the history items)
    live_rows: np.ndarray
    live_events: tuple[LiveEvent, ...]
    trained: torch.Tensor | None
    vector: torch.Tensor  # what the score used
    settings: tuple[Mapping[str, float], float, float, float, float]  # event weights, half-life, prior, now, share


def explainer(model: ServingModel, row: int | None, live_rows: np.ndarray, live_events: Sequence[LiveEvent],
              vector: torch.Tensor, event_weights: Mapping[str, float], half_life_s: float, prior_weight: float,
              now_ms: float, max_share: float) -> Explainer:
    history = np.zeros(0, np.int64)
    coef = np.zeros(0)
    trained = model.users[row] if row is not None else None
    if trained is not None:
        history = model.seen(row).astype(np.int64)
        if len(history):
            basis = model.items[torch.from_numpy(history)].double().numpy()  # [n, d]
            coef = np.linalg.lstsq(basis.T, trained.double().numpy(), rcond=None)[0]
    return Explainer(history, coef, np.asarray(live_rows, np.int64), tuple(live_events), trained, vector,
                     (event_weights, half_life_s, prior_weight, now_ms, max_share))


def _vector(model: ServingModel, x: Explainer, trained: torch.Tensor | None, keep: list[int]) -> torch.Tensor:
    """The shopper's vector from this trained part and these of their live events (the fold, as served)."""
    event_weights, half_life_s, prior_weight, now_ms, max_share = x.settings
    if not keep:
        return trained if trained is not None else torch.zeros_like(x.vector)
    return fold(model, trained, x.live_rows[keep], [x.live_events[i] for i in keep], event_weights, half_life_s,
                prior_weight, now_ms, max_share)


def explain(model: ServingModel, x: Explainer, item_row: int, top: int = 3) -> list[dict]:
    """The items of the shopper's evidence whose removal lowers this item's score most, with how much."""
    target = model.items[item_row].double()
    score = float(x.vector.double() @ target)
    everything = list(range(len(x.live_rows)))
    drops: dict[tuple[str, int], float] = {}
    if len(x.history_rows) and not everything:  # the trained vector alone: linear in its decomposition
        parts = x.coef * (model.items[torch.from_numpy(x.history_rows)].double() @ target).numpy()
        drops.update({("history", j): float(d) for j, d in zip(x.history_rows.tolist(), parts, strict=True)})
    else:
        for j, c in zip(x.history_rows.tolist(), x.coef.tolist(), strict=True):
            without = _vector(model, x, x.trained - c * model.items[j], everything)
            drops[("history", j)] = score - float(without.double() @ target)
    for idx in everything:
        without = _vector(model, x, x.trained, [i for i in everything if i != idx])
        key = ("live", int(x.live_rows[idx]))
        drops[key] = drops.get(key, 0.0) + score - float(without.double() @ target)
    ranked = sorted(drops.items(), key=lambda kv: (-kv[1], kv[0][1]))[:top]
    out = []
    for (source, j), drop in ranked:
        if drop <= 0:
            break
        why = {"item_id": model.item_ids[j], "contribution": round(drop, 6), "source": source}
        if model.item_category[j] >= 0 and model.item_category[j] == model.item_category[item_row]:
            why["category"] = model.category_ids[model.item_category[j]]
        if model.item_brand[j] >= 0 and model.item_brand[j] == model.item_brand[item_row]:
            why["brand"] = model.brand_ids[model.item_brand[j]]
        out.append(why)
    return out
