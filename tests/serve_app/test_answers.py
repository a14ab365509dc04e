"""Precomputed answers equal exact scoring's, user by user, across block boundaries; a newer version cancels them."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import registry
import serve_app.answers as answers_module
from core.storage import Storage
from serve_app.answers import precompute
from serve_app.model_store import ServingModel, build_serving_model
from serve_app.ranking import top_k


def _model(tmp_path: Path, users: int = 300, items: int = 500, dim: int = 16) -> ServingModel:
    rng = np.random.default_rng(3)
    seen = [np.sort(rng.choice(items, int(rng.integers(0, min(40, items))), replace=False)) for _ in range(users)]
    seen[7] = np.arange(max(0, items - 5))  # a user who has seen all but five items
    indptr = np.cumsum([0] + [len(s) for s in seen]).astype(np.int64)
    pop = pa.table({"item_idx": pa.array(np.arange(items, dtype=np.int32)),
                    "score": pa.array(rng.random(items).astype(np.float32)),
                    "category_idx": pa.array((np.arange(items) % 7).astype(np.int32))})
    storage = Storage(str(tmp_path / "root"))
    version = registry.publish(storage, registry.ModelArtifacts(
        user_keys=[f"u{u}" for u in range(users)], user_vectors=rng.normal(size=(users, dim)).astype(np.float32),
        item_ids=[f"i{i}" for i in range(items)], item_vectors=rng.normal(size=(items, dim)).astype(np.float32),
        seen_indptr=indptr, seen_indices=np.concatenate(seen).astype(np.int32), popularity=pop, state_dict={},
        hparams={}, config_hash="t", metrics={}, k=20,
        node_counts={"user": users, "item": items, "category": 7, "brand": 0},
        category_ids=[f"c{c}" for c in range(7)]))
    return build_serving_model(registry.load_version(storage, version))


def test_precomputed_answers_are_exact_scorings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path)
    monkeypatch.setattr(answers_module, "BLOCK_USERS", 64)  # several blocks, the last one partial
    answers = precompute(model, depth=30)
    assert answers is not None and answers.version == model.version and answers.rows.shape == (300, 30)
    for row in range(len(model.user_keys)):
        for k in (1, 20, 30):
            rows, vals = top_k(model, model.users[row] @ model.items.T, row, k, True, None)
            got_rows, got_vals = answers.top(row, k)
            assert got_rows == rows, (row, k)
            assert got_vals == pytest.approx(vals, abs=1e-4)
            assert not set(got_rows) & set(model.seen(row).tolist())
    assert len(answers.top(7, 30)[0]) == 5  # fewer than k when fewer items qualify, as exact scoring


def test_a_cancelled_precomputation_gives_nothing(tmp_path: Path) -> None:
    cancelled = threading.Event()
    cancelled.set()
    assert precompute(_model(tmp_path, users=10, items=20), depth=5, cancelled=cancelled) is None
