"""The approximate index path answers like exact scoring: the same exclusions, category filter, folding and
/similar, k results however much a shopper has seen, and nearly the same items (recall against exact)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import registry
from core.storage import Storage
from registry.item_index import build
from serve_app import ranking
from serve_app.live_state import LiveEvent
from serve_app.model_store import ServingModel, build_serving_model

USERS, ITEMS, DIM, CATS, CLUSTERS = 200, 4000, 16, 7, 40
NPROBE = 24  # of the 102 lists 4,000 items get: approximate, as at scale


def _clustered(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    return (centres[rng.integers(0, len(centres), n)] + rng.normal(0, 0.4, (n, centres.shape[1]))).astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ServingModel:
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(CLUSTERS, DIM)).astype(np.float32)
    items = _clustered(rng, ITEMS, centres)
    seen = [np.sort(rng.choice(ITEMS, int(rng.integers(0, 60)), replace=False)) for _ in range(USERS)]
    seen[7] = np.arange(ITEMS - 5)  # a shopper who has seen all but five items
    indptr = np.cumsum([0] + [len(s) for s in seen]).astype(np.int64)
    pop = pa.table({"item_idx": pa.array(np.arange(ITEMS, dtype=np.int32)),
                    "score": pa.array(rng.random(ITEMS).astype(np.float32)),
                    "category_idx": pa.array((np.arange(ITEMS) % CATS).astype(np.int32))})
    storage = Storage(str(tmp_path_factory.mktemp("index") / "root"))
    version = registry.publish(storage, registry.ModelArtifacts(
        user_keys=[f"u{u}" for u in range(USERS)], user_vectors=_clustered(rng, USERS, centres),
        item_ids=[f"i{i}" for i in range(ITEMS)], item_vectors=items, seen_indptr=indptr,
        seen_indices=np.concatenate(seen).astype(np.int32), popularity=pop, state_dict={}, hparams={},
        config_hash="t", metrics={}, k=20, node_counts={"user": USERS, "item": ITEMS, "category": CATS, "brand": 0},
        category_ids=[f"c{c}" for c in range(CATS)], item_index=build(items)))
    served = build_serving_model(registry.load_version(storage, version))
    assert served.index is not None
    return served


def _exact(model: ServingModel, vector: torch.Tensor, row: int | None, k: int, cat: int | None = None,
           extra: np.ndarray | None = None) -> tuple[list[int], list[float]]:
    return ranking.top_k(model, model.items @ vector, row, k, True, cat, extra)


def test_index_answers_exclude_seen_items_score_exactly_and_find_what_exact_finds(model: ServingModel) -> None:
    overlap = []
    for row in range(USERS):
        rows, vals = ranking.top_k_indexed(model, model.users[row], row, 20, True, None, None, NPROBE)
        exact_rows, _ = _exact(model, model.users[row], row, 20)
        assert len(rows) == len(exact_rows) and len(set(rows)) == len(rows)
        assert not set(rows) & set(model.seen(row).tolist())
        assert vals == sorted(vals, reverse=True)
        assert vals == pytest.approx((model.items[rows] @ model.users[row]).tolist(), abs=1e-4)  # the same scores
        overlap.append(len(set(rows) & set(exact_rows)) / len(exact_rows))
    assert np.mean(overlap) >= 0.95, np.mean(overlap)


def test_a_shopper_who_has_seen_almost_everything_still_gets_what_is_left(model: ServingModel) -> None:
    rows, _ = ranking.top_k_indexed(model, model.users[7], 7, 20, True, None, None, NPROBE)
    assert sorted(rows) == list(range(ITEMS - 5, ITEMS))


def test_the_category_filter_is_exact_on_the_index_path(model: ServingModel) -> None:
    for row in range(0, USERS, 9):
        for cat in range(CATS):
            got = ranking.top_k_indexed(model, model.users[row], row, 15, True, cat, None, NPROBE)
            want = _exact(model, model.users[row], row, 15, cat)
            assert got[0] == want[0]
            assert got[1] == pytest.approx(want[1], abs=1e-4)
            assert all(model.item_category[r] == cat for r in got[0])


def test_folded_vectors_and_live_items_go_through_the_index_too(model: ServingModel) -> None:
    live_rows = np.array([3, 500, 1200], dtype=np.int64)
    events = [LiveEvent(item_id=model.item_ids[r], event="cart", ts_ms=1e6, received_ms=1e6) for r in live_rows]
    for row in (None, 0, 42):
        vector = ranking.fold(model, None if row is None else model.users[row], live_rows, events, {"cart": 3.0},
                              1800.0, 4.0, 1_000_000.0)
        rows, _ = ranking.top_k_indexed(model, vector, row, 20, True, None, live_rows, NPROBE)
        exact_rows, _ = _exact(model, vector, row, 20, extra=live_rows)
        assert len(rows) == 20 and not set(rows) & set(live_rows.tolist())
        assert len(set(rows) & set(exact_rows)) >= 18


def test_similar_through_the_index_ranks_by_cosine_without_the_item_itself(model: ServingModel) -> None:
    overlap = []
    for row in range(0, ITEMS, 97):
        rows, vals = ranking.similar_indexed(model, row, 10, NPROBE)
        exact_rows, exact_vals = ranking.similar(model, row, 10)
        assert len(rows) == 10 and row not in rows and vals == sorted(vals, reverse=True)
        assert max(vals) <= exact_vals[0] + 1e-5
        overlap.append(len(set(rows) & set(exact_rows)) / 10)
    assert np.mean(overlap) >= 0.9, np.mean(overlap)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.integers(0, USERS - 1), k=st.integers(1, 200), extra=st.lists(st.integers(0, ITEMS - 1), max_size=300),
       cat=st.one_of(st.none(), st.integers(0, CATS - 1)), exclude=st.booleans())
def test_generated_requests_keep_every_promise_on_the_index_path(model: ServingModel, row: int, k: int,
                                                                 extra: list[int], cat: int | None,
                                                                 exclude: bool) -> None:
    extra_rows = np.array(extra, dtype=np.int64)
    rows, vals = ranking.top_k_indexed(model, model.users[row], row, k, exclude, cat, extra_rows, NPROBE)
    exact_rows, _ = ranking.top_k(model, model.items @ model.users[row], row, k, exclude, cat, extra_rows)
    assert len(rows) == len(exact_rows)  # as many results as exact scoring gives (k, or all that qualify)
    assert len(set(rows)) == len(rows)
    if exclude:
        assert not set(rows) & (set(model.seen(row).tolist()) | set(extra))
    if cat is not None:
        assert all(model.item_category[r] == cat for r in rows)
    assert vals == sorted(vals, reverse=True)


def test_precomputed_answers_through_the_index_keep_its_promises(model: ServingModel,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import serve_app.answers as answers_module

    monkeypatch.setattr(answers_module, "BLOCK_USERS", 64)  # several batched walks, the last one partial
    monkeypatch.setattr(answers_module, "SEEN_MARGIN", 8)  # shoppers with more seen items walk again on their own
    answers = answers_module.precompute_indexed(model, 30, NPROBE)
    assert answers is not None and answers.version == model.version and answers.rows.shape == (USERS, 30)
    overlap = []
    for row in range(USERS):
        rows, vals = answers.top(row, 20)
        exact_rows, _ = _exact(model, model.users[row], row, 20)
        assert len(rows) == len(exact_rows) and len(set(rows)) == len(rows)
        assert not set(rows) & set(model.seen(row).tolist())
        assert vals.tolist() == sorted(vals.tolist(), reverse=True)
        assert vals.tolist() == pytest.approx((model.items[rows] @ model.users[row]).tolist(), abs=1e-4)
        overlap.append(len(set(rows) & set(exact_rows)) / len(exact_rows))
    assert np.mean(overlap) >= 0.95, np.mean(overlap)
    assert sorted(answers.top(7, 30)[0]) == list(range(ITEMS - 5, ITEMS))  # all that is left, and no padding


def test_a_cancelled_indexed_precomputation_gives_nothing(model: ServingModel) -> None:
    import threading

    from serve_app.answers import precompute_indexed

    cancelled = threading.Event()
    cancelled.set()
    assert precompute_indexed(model, 10, NPROBE, cancelled) is None
