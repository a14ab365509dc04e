"""A request's arithmetic without Ray or HTTP: top-k with exclusions and a category filter, the live fold, similar
items, on a toy version of known geometry (tests.helpers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import registry
from core.storage import Storage
from serve_app.live_state import LiveEvent
from serve_app.model_store import ServingModel, build_serving_model
from serve_app.ranking import fold, similar, top_k
from tests.helpers import N_CATS, N_ITEMS, publish_toy_version, toy_seen

WEIGHTS = {"view": 1.0, "click": 2.0, "cart": 4.0, "fav": 3.0, "purchase": 8.0}
NOW_MS = 1_767_225_600_000


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ServingModel:
    storage = Storage(str(tmp_path_factory.mktemp("toy") / "root"))
    version = publish_toy_version(storage, seed=1)
    return build_serving_model(registry.load_version(storage, version))


def _scores(model: ServingModel, row: int) -> torch.Tensor:
    return model.users[row] @ model.items.T


def test_top_k_excludes_seen_items_unless_asked_not_to(model: ServingModel) -> None:
    rows, vals = top_k(model, _scores(model, 4), 4, 10, exclude_seen=True, cat_idx=None)
    assert len(rows) == 10 and not set(rows) & set(toy_seen(4))
    assert vals == sorted(vals, reverse=True)
    everything, _ = top_k(model, _scores(model, 4), 4, N_ITEMS, exclude_seen=False, cat_idx=None)
    assert set(toy_seen(4)) <= set(everything)


def test_top_k_keeps_only_the_category_and_returns_fewer_when_fewer_qualify(model: ServingModel) -> None:
    rows, _ = top_k(model, _scores(model, 1), 1, 5, exclude_seen=True, cat_idx=2)
    assert [r % N_CATS for r in rows] == [2] * 5
    # Category 1 holds 20 items; user 1 has seen 3 of them: at most 17 remain, and the posted rows are gone too.
    rows, _ = top_k(model, _scores(model, 1), 1, 40, exclude_seen=True, cat_idx=1, extra_seen=np.array([10, 13]))
    assert len(rows) == 15 and not {10, 13} & set(rows) and all(r % N_CATS == 1 for r in rows)
    assert model.category_index == {f"cat-{c}": c for c in range(N_CATS)}  # names come with the version


def test_folding_live_events_moves_the_vector_towards_what_was_touched(model: ServingModel) -> None:
    posted = np.array([2, 5, 8])  # category 2; user 4 likes category 1
    events = [LiveEvent(f"item-{i}", "purchase", NOW_MS, NOW_MS) for i in posted]
    trained = model.users[4]
    folded = fold(model, trained, posted, events, WEIGHTS, half_life_s=1800, prior_weight=4.0, now_ms=NOW_MS)
    assert torch.isclose(folded.norm(), trained.norm(), rtol=0.2)
    rows, _ = top_k(model, folded @ model.items.T, 4, 5, exclude_seen=True, cat_idx=None, extra_seen=posted)
    assert sum(r % N_CATS == 2 for r in rows) >= 3 and not set(rows) & set(posted.tolist())


def test_old_and_light_events_weigh_less(model: ServingModel) -> None:
    trained = model.users[4]
    rows = np.array([2])
    fresh = fold(model, trained, rows, [LiveEvent("item-2", "purchase", NOW_MS, NOW_MS)], WEIGHTS, 1800, 4.0, NOW_MS)
    old = LiveEvent("item-2", "purchase", NOW_MS - 36_000_000, NOW_MS)
    stale = fold(model, trained, rows, [old], WEIGHTS, 1800, 4.0, NOW_MS)
    light = fold(model, trained, rows, [LiveEvent("item-2", "view", NOW_MS, NOW_MS)], WEIGHTS, 1800, 4.0, NOW_MS)
    target = model.items[2] / model.items[2].norm()

    def pull(v: torch.Tensor) -> float:
        return float(v @ target / v.norm())

    assert pull(fresh) > pull(light) > pull(trained) and pull(fresh) > pull(stale)


def test_a_user_the_model_never_saw_gets_the_mean_of_their_items(model: ServingModel) -> None:
    rows = np.array([0, 3])
    events = [LiveEvent("item-0", "view", NOW_MS, NOW_MS), LiveEvent("item-3", "view", NOW_MS, NOW_MS)]
    folded = fold(model, None, rows, events, WEIGHTS, 1800, 4.0, NOW_MS)
    assert torch.allclose(folded, model.items[[0, 3]].mean(dim=0))


def test_similar_items_share_the_category_and_exclude_the_item(model: ServingModel) -> None:
    rows, vals = similar(model, 5, 6)
    assert 5 not in rows and all(r % N_CATS == 5 % N_CATS for r in rows)
    assert vals == sorted(vals, reverse=True) and all(v <= 1.0 + 1e-6 for v in vals)


def test_serving_model_reads_only_the_version(tmp_path: Path) -> None:
    """Category names come from the version: a root holding nothing but checkpoints/ serves the filter."""
    storage = Storage(str(tmp_path / "root"))
    publish_toy_version(storage, seed=3)
    assert sorted(p.name for p in Path(storage.root).iterdir()) == ["checkpoints"]
    served = build_serving_model(registry.load_latest(storage))
    assert set(served.popular_by_category) == {f"cat-{c}" for c in range(N_CATS)}


def test_a_burst_of_posted_events_never_takes_a_known_users_vector_over(model: ServingModel) -> None:
    """However many purchases are posted for a known user, what the model learned of them keeps its share."""
    trained = model.users[4]
    burst = [LiveEvent("item-2", "purchase", NOW_MS, NOW_MS)] * 50
    rows = np.full(50, 2)
    capped = fold(model, trained, rows, burst, WEIGHTS, 1800, 4.0, NOW_MS, max_share=0.5)
    unbounded = fold(model, trained, rows, burst, WEIGHTS, 1800, 4.0, NOW_MS)
    mean = model.items[2] * trained.norm() / model.items[2].norm()
    assert torch.allclose(capped, 0.5 * trained + 0.5 * mean, atol=1e-5)
    assert float((unbounded - mean).norm()) < float((capped - mean).norm())
