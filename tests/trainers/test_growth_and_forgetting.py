"""Pure pieces of updates and publishing, without Ray: growing a model to new nodes, what a warm start trains on,
and how a deleted user is blanked in a published version."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from core.config import parse_config
from trainers.data import InterestGraph, split
from trainers.graph import node_offsets
from trainers.publish import forget, popularity, seen_csr
from trainers.warm_start import extend_embeddings, update_pair_index

DAY = 86_400_000
T0 = 1_767_225_600_000


def _graph(users: int, items: int, cats: int, brands: int, pairs: list[tuple[int, int, float]],
           item_cat: list[tuple[int, int]], item_brand: list[tuple[int, int]] = ()) -> InterestGraph:
    """`pairs` are (user, item, day of first and last event)."""
    u, i = (np.array([p[k] for p in pairs], dtype=np.int64) for k in range(2))
    ts = T0 + (np.array([p[2] for p in pairs]) * DAY).astype(np.int64)
    return InterestGraph(
        num_users=users, num_items=items, num_categories=cats, num_brands=brands, ui_user=u, ui_item=i,
        ui_weight=np.ones(len(u), np.float32), ui_count=np.ones(len(u), np.int32), ui_first_ts=ts, ui_last_ts=ts,
        ic_item=np.array([p[0] for p in item_cat], np.int64), ic_cat=np.array([p[1] for p in item_cat], np.int64),
        ib_item=np.array([p[0] for p in item_brand], np.int64),
        ib_brand=np.array([p[1] for p in item_brand], np.int64),
        watermark_ms=int(ts.max()), formats=["events"], official_user=np.zeros(0, np.int64),
        official_item=np.zeros(0, np.int64))


def test_old_nodes_keep_their_vectors_and_new_ones_start_where_the_graph_puts_them() -> None:
    old_counts = {"user": 2, "item": 3, "category": 1, "brand": 0}
    dim = 4
    rng = np.random.default_rng(0)
    old = rng.normal(size=(sum(old_counts.values()), dim)).astype(np.float32)
    # New: user 2 (touched items 0 and 1), item 3 in new category 1 (whose only old item is 2) and new brand 0.
    graph = _graph(3, 4, 2, 1, [(0, 0, 0), (1, 2, 0), (2, 0, 1), (2, 1, 1)],
                   item_cat=[(0, 0), (1, 0), (2, 1), (3, 1)], item_brand=[(3, 0)])
    grown = extend_embeddings(old, old_counts, graph, graph.ui_user, graph.ui_item)
    off = node_offsets(3, 4, 2, 1)
    assert grown.shape == (off.num_nodes, dim)
    np.testing.assert_array_equal(grown[:2], old[:2])  # old users
    np.testing.assert_array_equal(grown[off.item:off.item + 3], old[2:5])  # old items
    np.testing.assert_array_equal(grown[off.category], old[5])  # old category
    item = lambda k: grown[off.item + k]  # noqa: E731
    np.testing.assert_allclose(grown[off.category + 1], item(2), rtol=1e-6)  # new category: mean of its items
    np.testing.assert_allclose(grown[off.brand], old[2:5].mean(axis=0), rtol=1e-6)  # no known item: item mean
    np.testing.assert_allclose(item(3), (grown[off.category + 1] + grown[off.brand]) / 2, rtol=1e-6)
    np.testing.assert_allclose(grown[2], (item(0) + item(1)) / 2, rtol=1e-6)  # new user: mean of touched items


def test_a_graph_that_lost_nodes_is_refused() -> None:
    graph = _graph(1, 2, 0, 0, [(0, 0, 0)], item_cat=[])
    with pytest.raises(ValueError, match="fewer user nodes"):
        extend_embeddings(np.zeros((5, 2), np.float32), {"user": 3, "item": 2, "category": 0, "brand": 0}, graph,
                          graph.ui_user, graph.ui_item)


def _stream(replay_ratio: float) -> tuple:
    """The parent saw days 0-5 (its watermark: day 5) and held out days 4-5; day 6 is new; day 7.5 is the new
    holdout. Returns the config, the graph and its split."""
    cfg = parse_config({"train": {"holdout": "last_days", "holdout_days": 1.0},
                        "update": {"replay_ratio": replay_ratio}})
    pairs = [(u, (u + d) % 20, d) for u in range(40) for d in range(6)] + [(u, 30 + u % 3, 6) for u in range(10)]
    pairs += [(u, 40, 7.5) for u in range(5)]
    graph = _graph(40, 41, 0, 0, pairs, item_cat=[])
    return cfg, graph, split(graph, "last_days", 1.0)


def test_a_warm_start_trains_on_everything_new_plus_replayed_old_pairs() -> None:
    cfg, graph, sp = _stream(1.0)
    index, new = update_pair_index(graph, sp, cfg, parent_watermark_ms=T0 + 5 * DAY)
    days = (sp.train_last_ts[index] - T0) / DAY
    train_days = (sp.train_last_ts - T0) / DAY
    assert len(index) == len(set(index.tolist()))
    # Every pair the parent never trained on: the new day and its own held-out days ...
    fresh = (train_days >= 4) & (train_days <= 6)
    assert set(np.flatnonzero(fresh).tolist()) <= set(index.tolist()) and new == fresh.sum()
    # ... plus as many older pairs replayed (replay_ratio 1), and never the new holdout.
    assert (days < 4).sum() == fresh.sum() and not (days == 7.5).any()


def test_a_parent_that_learned_its_holdout_is_not_taught_it_again() -> None:
    """train.refit: the first version learned the pairs it was evaluated on, so only what arrived since is new."""
    cfg, graph, sp = _stream(0.0)
    held_too, _ = update_pair_index(graph, sp, cfg, parent_watermark_ms=T0 + 5 * DAY)
    index, new = update_pair_index(graph, sp, cfg, parent_watermark_ms=T0 + 5 * DAY, parent_learned_holdout=True)
    days = (sp.train_last_ts[index] - T0) / DAY
    assert new == 10 and (days == 6).all() and len(held_too) > len(index)


def test_deleted_users_are_blanked_in_place() -> None:
    keys = pa.array(["a", "b", "c"])
    vectors = np.ones((3, 2), np.float32)
    indptr, indices = np.array([0, 2, 3, 5], np.int64), np.array([0, 1, 2, 0, 2], np.int32)
    state = {"embedding.weight": torch.ones(3 + 4, 2)}
    evidence = {"weight": np.arange(5, dtype=np.float32)}
    new_keys, new_vecs, new_ptr, new_idx, new_state, new_evidence = forget(
        np.array([1]), keys, vectors, indptr, indices, state, evidence)
    assert new_keys.to_pylist() == ["a", None, "c"]
    assert new_vecs[1].tolist() == [0.0, 0.0] and new_vecs[[0, 2]].all()
    assert new_ptr.tolist() == [0, 2, 2, 4] and new_idx.tolist() == [0, 1, 0, 2]
    assert new_evidence["weight"].tolist() == [0.0, 1.0, 3.0, 4.0]  # the deleted user's evidence went with them
    assert not new_state["embedding.weight"][1].any() and new_state["embedding.weight"][[0, 2, 3]].all()
    assert state["embedding.weight"].all() and vectors.all()  # the caller's arrays are untouched


def test_popularity_and_seen_items_from_the_graph() -> None:
    graph = _graph(2, 3, 2, 0, [(0, 0, 0), (0, 1, 0), (1, 1, 0)], item_cat=[(1, 1), (1, 0), (2, 1)])
    pop = popularity(graph).to_pydict()
    assert pop["score"] == [1.0, 2.0, 0.0] and pop["category_idx"] == [-1, 0, 1]  # an item's lowest category
    assert pop["brand_idx"] == [-1, -1, -1]
    indptr, indices, evidence = seen_csr(graph)
    assert indptr.tolist() == [0, 2, 3] and indices.tolist() == [0, 1, 1]
    assert evidence is None  # this graph keeps no evidence per pair


def test_a_cycle_touches_new_nodes_and_both_ends_of_its_new_pairs_only() -> None:
    from trainers.warm_start import touched_rows

    old_counts = {"user": 3, "item": 4, "category": 1, "brand": 1}
    # New since the parent: user 3, item 4, category 1. Pairs: 0-0, 1-1, 2-2 (old), 3-4 and 1-3 (new).
    graph = _graph(4, 5, 2, 1, [(0, 0, 0), (1, 1, 0), (2, 2, 0), (3, 4, 1), (1, 3, 1)],
                   item_cat=[(0, 0), (4, 1)], item_brand=[(1, 0)])
    train_user, train_item = graph.ui_user, graph.ui_item
    pair_index = np.array([3, 4, 0])  # two new pairs first, then one replayed
    mask = touched_rows(graph, train_user, train_item, pair_index, 2, old_counts)
    off = node_offsets(4, 5, 2, 1)
    expected = {off.user + 3, off.user + 1, off.item + 4, off.item + 3, off.category + 1}
    assert set(np.flatnonzero(mask).tolist()) == expected
    assert len(mask) == off.num_nodes
