"""Interest profiles and explanations without Ray or HTTP, on a small version whose evidence is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import registry
from core.storage import Storage
from serve_app.live_state import LiveEvent
from serve_app.model_store import ServingModel, build_serving_model
from serve_app.profiles import Evidence, _vector, evidence, explain, explainer, profile
from serve_app.ranking import fold

WEIGHTS = {"view": 1.0, "click": 2.0, "cart": 4.0, "fav": 3.0, "purchase": 8.0}
NOW = 1_767_225_600_000
DAY = 86_400_000
CATS, BRANDS, DIM = ["shoes", "bags", "hats", "socks"], ["acme", "zeta"], 6
# item i: category i % 4, brand i % 2; 24 items. User 0's evidence: shoes heavily and lately, bags once long ago.
N_ITEMS = 24


def _version(tmp_path: Path) -> ServingModel:
    rng = np.random.default_rng(0)
    cat_dirs = np.eye(DIM, dtype=np.float32)[:4] * 2
    items = cat_dirs[np.arange(N_ITEMS) % 4] + rng.normal(0, 0.2, (N_ITEMS, DIM)).astype(np.float32)
    users = np.stack([cat_dirs[0] + 0.3 * cat_dirs[2], cat_dirs[3]]).astype(np.float32)
    # user 0 saw items 0, 4 (shoes: purchase + cart, this week), 1 (bags: a view, a month ago)
    seen = {0: [0, 1, 4], 1: [3]}
    indptr = np.array([0, 3, 4], np.int64)
    indices = np.array([0, 1, 4, 3], np.int32)
    counts = np.zeros((4, 5), np.int32)
    counts[0, 4], counts[1, 0], counts[2, 2], counts[3, 0] = 1, 1, 1, 2
    ev = {"weight": np.array([7.0, 0.2, 3.5, 2.0], np.float32),
          "weight_recent": np.array([6.0, 0.0, 3.0, 0.5], np.float32), "counts": counts,
          "last_ts": np.array([NOW - DAY, NOW - 30 * DAY, NOW - 2 * DAY, NOW - 5 * DAY], np.int64)}
    assert all(sorted(v) == v for v in seen.values())
    pop = pa.table({"item_idx": pa.array(np.arange(N_ITEMS, dtype=np.int32)),
                    "score": pa.array(np.linspace(1, 0, N_ITEMS).astype(np.float32)),
                    "category_idx": pa.array((np.arange(N_ITEMS) % 4).astype(np.int32)),
                    "brand_idx": pa.array((np.arange(N_ITEMS) % 2).astype(np.int32))})
    storage = Storage(str(tmp_path / "root"))
    version = registry.publish(storage, registry.ModelArtifacts(
        user_keys=["u0", "u1"], user_vectors=users, item_ids=[f"item-{i}" for i in range(N_ITEMS)],
        item_vectors=items, seen_indptr=indptr, seen_indices=indices, popularity=pop, state_dict={}, hparams={},
        config_hash="t", metrics={}, k=20, node_counts={"user": 2, "item": N_ITEMS, "category": 4, "brand": 2},
        category_ids=CATS, brand_ids=BRANDS, category_vectors=cat_dirs, brand_vectors=np.zeros((2, DIM), np.float32),
        watermark_ms=NOW, seen_evidence=ev))
    return build_serving_model(registry.load_version(storage, version))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ServingModel:
    return _version(tmp_path_factory.mktemp("profiles"))


def test_a_profile_follows_the_evidence_by_event_weight_and_recency(model: ServingModel) -> None:
    out = profile(model, evidence(model, 0, [], WEIGHTS), model.users[0], 5)
    assert [c["category"] for c in out["categories"]] == ["shoes", "bags"]
    shoes, bags = out["categories"]
    assert shoes["weight"] > 0.9 and shoes["events"] == {"cart": 1, "purchase": 1}
    # Nearly all of their weight, lately as before: steady; bags only long ago: fading.
    assert shoes["last_seen_ms"] == NOW - DAY and shoes["trend"] == "steady" and bags["trend"] == "fading"
    assert [b["brand"] for b in out["brands"]] == ["acme", "zeta"]  # items 0, 4 are acme; item 1 zeta


def test_trend_compares_an_interests_recent_share_with_its_long_run_share(model: ServingModel) -> None:
    # Two shoe items (rows 0, 4) heavy in the long run, quiet lately; one hat (row 2) light but all recent.
    ev = Evidence(rows=np.array([0, 4, 2]), weight=np.array([6.0, 4.0, 2.0]), weight_recent=np.array([0.5, 0.5, 2.0]),
                  counts=np.array([[5, 0, 0, 0, 0], [3, 0, 0, 0, 0], [0, 1, 0, 0, 0]]),
                  last_ms=np.array([NOW - 9 * DAY, NOW - 8 * DAY, NOW]), live=np.zeros(3, bool))
    out = profile(model, ev, None, 5)
    assert [(c["category"], c["trend"]) for c in out["categories"]] == [("shoes", "fading"), ("hats", "rising")]
    assert out["categories"][0]["events"] == {"view": 8} and out["categories"][0]["weight"] == pytest.approx(10 / 12,
                                                                                                            abs=1e-4)


def test_a_live_click_puts_a_new_category_in_the_profile(model: ServingModel) -> None:
    live = [LiveEvent("item-2", "click", NOW, NOW), LiveEvent("item-6", "purchase", NOW, NOW)]
    out = profile(model, evidence(model, 0, live, WEIGHTS), model.users[0], 5)
    hats = next(c for c in out["categories"] if c["category"] == "hats")
    assert hats["live_events"] == 2 and hats["events"] == {"click": 1, "purchase": 1}
    assert out["evidence"] == {"items": 5, "live_events": 2}


def test_latent_interests_are_the_nearest_untouched_ones(model: ServingModel) -> None:
    out = profile(model, evidence(model, 0, [], WEIGHTS), model.users[0], 5)
    latent = [c["category"] for c in out["latent"]["categories"]]
    assert latent[0] == "hats" and not {"shoes", "bags"} & set(latent)  # user 0 leans to hats, never touched them
    assert out["latent"]["brands"] == []  # brands without a learned vector are no one's latent interest


def test_a_shopper_known_only_from_live_events_has_a_profile_and_an_unknown_one_none(model: ServingModel) -> None:
    live = [LiveEvent("item-3", "view", NOW, NOW)]
    out = profile(model, evidence(model, None, live, WEIGHTS), None, 5)
    assert [c["category"] for c in out["categories"]] == ["socks"]
    assert profile(model, evidence(model, None, [], WEIGHTS), None, 5)["categories"] == []


def test_explanations_name_the_evidence_whose_removal_lowers_the_score_most(model: ServingModel) -> None:
    live = [LiveEvent("item-2", "purchase", NOW, NOW), LiveEvent("item-7", "view", NOW - 60_000, NOW)]
    rows = np.array([2, 7])
    settings = (WEIGHTS, 1800.0, 4.0, float(NOW), 0.8)
    vector = fold(model, model.users[0], rows, live, *settings)
    x = explainer(model, 0, rows, live, vector, *settings)
    target_rows = torch.topk(vector @ model.items.T, 6).indices.tolist()
    for target in target_rows:
        because = explain(model, x, target)
        assert because, target
        named = because[0]["item_id"]
        score = float(vector.double() @ model.items[target].double())
        # Independently: each evidence item taken out of the shopper's vector, everything else as served.
        drops = {}
        everything = list(range(len(rows)))
        for j, c in zip(x.history_rows.tolist(), x.coef.tolist(), strict=True):
            trained = model.users[0] - c * model.items[j]
            drops[f"item-{j}"] = score - float(fold(model, trained, rows, live, *settings).double()
                                               @ model.items[target].double())
        for idx in everything:
            keep = [i for i in everything if i != idx]
            alone = fold(model, model.users[0], rows[keep], [live[i] for i in keep], *settings)
            drops[f"item-{rows[idx]}"] = score - float(alone.double() @ model.items[target].double())
        assert drops[named] == pytest.approx(max(drops.values()), rel=1e-6), (target, because, drops)
        assert because[0]["contribution"] == pytest.approx(drops[named], abs=1e-5)
    # The trained vector is its history items plus what they do not span: the decomposition is exact.
    residual = model.users[0].double() - (torch.from_numpy(x.coef) @ model.items[torch.from_numpy(x.history_rows)]
                                           .double())
    assert torch.isclose(residual.norm(), torch.tensor(0.0, dtype=torch.float64), atol=5.0)
    assert _vector(model, x, model.users[0], list(range(len(rows)))).allclose(vector)


def test_an_explanation_says_when_a_shared_category_is_the_link(model: ServingModel) -> None:
    live = [LiveEvent("item-8", "purchase", NOW, NOW)]  # shoes
    rows = np.array([8])
    settings = (WEIGHTS, 1800.0, 4.0, float(NOW), 0.8)
    vector = fold(model, None, rows, live, *settings)
    because = explain(model, explainer(model, None, rows, live, vector, *settings), 12)  # item 12: shoes too
    assert because == [{"item_id": "item-8", "contribution": pytest.approx(float(vector @ model.items[12]), abs=1e-5),
                        "source": "live", "category": "shoes", "brand": "acme"}]


def test_without_live_events_an_explanation_is_the_trained_vectors_decomposition(model: ServingModel) -> None:
    vector = model.users[0]
    x = explainer(model, 0, np.zeros(0, np.int64), [], vector, WEIGHTS, 1800.0, 4.0, float(NOW), 0.8)
    for target in (2, 6, 10):
        because = explain(model, x, target, top=3)
        drops = {f"item-{j}": float(vector.double() @ model.items[target].double())
                 - float((vector - c * model.items[j]).double() @ model.items[target].double())
                 for j, c in zip(x.history_rows.tolist(), x.coef.tolist(), strict=True)}
        positive = sorted((d for d in drops.values() if d > 0), reverse=True)
        assert [b["contribution"] for b in because] == pytest.approx(positive[:3], abs=1e-5)
        assert all(b["source"] == "history" for b in because)
