"""data.seen_events: which event types make an item seen. Serving excludes exactly those items: the version's (from
the events-by-type evidence) and the live ones, on every answering path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.config import parse_config
from core.storage import Storage
from serve_app import model_store
from serve_app.live_state import LiveEvent
from serve_app.model_store import EVENT_TYPES, ServingModel, build_serving_model, exclusion_csr
from serve_app.ranking import seen_live, top_k

N_ITEMS, DIM = 12, 4
# user 0: item 0 viewed, item 1 carted, item 2 purchased; user 1: item 3 viewed and purchased
INDPTR = np.array([0, 3, 4], np.int64)
INDICES = np.array([0, 1, 2, 3], np.int32)
COUNTS = np.array([[2, 0, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 1]], np.int32)


def _publish(tmp_path: Path, evidence: bool = True) -> registry.LoadedVersion:
    # every item scores the same for user 0, so exclusions alone decide what is left
    items = np.tile(np.eye(DIM, dtype=np.float32)[0], (N_ITEMS, 1))
    ev = {"weight": np.ones(4, np.float32), "weight_recent": np.ones(4, np.float32), "counts": COUNTS,
          "last_ts": np.zeros(4, np.int64)} if evidence else None
    pop = pa.table({"item_idx": pa.array(np.arange(N_ITEMS, dtype=np.int32)),
                    "score": pa.array(np.linspace(1, 0, N_ITEMS).astype(np.float32)),
                    "category_idx": pa.array(np.zeros(N_ITEMS, np.int32))})
    storage = Storage(str(tmp_path / "root"))
    version = registry.publish(storage, registry.ModelArtifacts(
        user_keys=["u0", "u1"], user_vectors=np.ones((2, DIM), np.float32),
        item_ids=[f"item-{i}" for i in range(N_ITEMS)], item_vectors=items, seen_indptr=INDPTR,
        seen_indices=INDICES, popularity=pop, state_dict={}, hparams={}, config_hash="t", metrics={}, k=20,
        node_counts={"user": 2, "item": N_ITEMS, "category": 1, "brand": 0}, category_ids=["c"],
        category_vectors=np.zeros((1, DIM), np.float32), seen_evidence=ev))
    return registry.load_version(storage, version)


def _answer(model: ServingModel, row: int, extra: np.ndarray | None = None) -> set[int]:
    rows, _ = top_k(model, model.users[row] @ model.items.T, row, N_ITEMS, True, None, extra)
    return set(rows)


def test_purchases_alone_are_seen_by_default_and_every_type_excludes_everything_touched(tmp_path: Path) -> None:
    assert parse_config({}).data.seen_events == ["purchase"]  # chosen by bench.seen_events (README)
    model = build_serving_model(_publish(tmp_path), EVENT_TYPES)
    assert _answer(model, 0) == set(range(3, N_ITEMS)) and _answer(model, 1) == set(range(N_ITEMS)) - {3}


def test_only_purchases_seen_keeps_viewed_and_carted_items_as_candidates(tmp_path: Path) -> None:
    model = build_serving_model(_publish(tmp_path), ["purchase"])
    assert _answer(model, 0) == set(range(N_ITEMS)) - {2}
    assert _answer(model, 1) == set(range(N_ITEMS)) - {3}
    assert model.seen(0).tolist() == [0, 1, 2]  # profiles and explanations still see everything touched
    carts = build_serving_model(_publish(tmp_path / "b"), ["cart", "purchase"])
    assert _answer(carts, 0) == set(range(N_ITEMS)) - {1, 2}
    nothing = build_serving_model(_publish(tmp_path / "c"), [])
    assert _answer(nothing, 0) == set(range(N_ITEMS))


def test_a_version_without_events_by_type_excludes_every_seen_item(tmp_path: Path) -> None:
    model = build_serving_model(_publish(tmp_path, evidence=False), ["purchase"])
    assert _answer(model, 0) == set(range(3, N_ITEMS))


def test_live_events_exclude_their_item_only_when_their_type_is_seen() -> None:
    events = [LiveEvent("item-5", "view", 1, 1), LiveEvent("item-6", "purchase", 2, 2),
              LiveEvent("item-7", "cart", 3, 3)]
    rows = np.array([5, 6, 7], np.int64)
    assert seen_live(rows, events, {"purchase"}).tolist() == [6]
    assert seen_live(rows, events, set(EVENT_TYPES)).tolist() == [5, 6, 7]
    assert seen_live(rows[:0], [], {"purchase"}).tolist() == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 30), st.lists(st.integers(0, 3), min_size=5, max_size=5)
                                   .filter(any)),  # a seen pair holds at least one event
                         max_size=6), min_size=1, max_size=8),
       st.sets(st.sampled_from(EVENT_TYPES)), st.integers(1, 4))
def test_exclusion_keeps_exactly_the_items_with_a_seen_type_event(users: list, types: set[str], block: int) -> None:
    rows = [sorted({item: counts for item, counts in user}.items()) for user in users]
    indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    indices = np.array([item for r in rows for item, _ in r], np.int32)
    counts = np.array([c for r in rows for _, c in r], np.int32).reshape(-1, len(EVENT_TYPES))
    saved = model_store.EXCLUSION_BLOCK_USERS
    model_store.EXCLUSION_BLOCK_USERS = block  # blocks of users, so their boundaries fall everywhere
    try:
        out_ptr, out_idx = exclusion_csr(indptr, indices, {"counts": counts}, types)
    finally:
        model_store.EXCLUSION_BLOCK_USERS = saved
    assert len(out_ptr) == len(indptr) and out_ptr[-1] == len(out_idx)
    for u, r in enumerate(rows):
        expected = [item for item, c in r if any(c[EVENT_TYPES.index(t)] > 0 for t in types)]
        assert out_idx[out_ptr[u]:out_ptr[u + 1]].tolist() == expected


@pytest.mark.parametrize("types", [["purchase"], list(EVENT_TYPES)])
def test_precomputed_answers_exclude_the_same_items(tmp_path: Path, types: list[str]) -> None:
    from serve_app.answers import precompute

    model = build_serving_model(_publish(tmp_path), types)
    answers = precompute(model, N_ITEMS)
    assert answers is not None and set(answers.top(0, N_ITEMS)[0]) == _answer(model, 0)
