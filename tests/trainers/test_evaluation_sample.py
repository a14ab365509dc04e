"""What an evaluation scores at scale: a seeded sample of test users, the same for the model and popularity, and a
training worker's slim view of the graph written in ingestion's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.train_scale import synthetic_graph
from core.storage import Storage
from trainers import metrics
from trainers.data import Split, evaluated_pairs, load_graph, split
from trainers.sampling import csr_from_pairs


def _split(test_user: np.ndarray, test_item: np.ndarray) -> Split:
    empty = np.zeros(0, np.int64)
    return Split(empty, empty, empty.astype(np.float32), empty, test_user, test_item, "last_days",
                 np.zeros(len(test_user), bool))


@settings(max_examples=50, deadline=None)
@given(users=st.lists(st.integers(0, 60), min_size=1, max_size=200), cap=st.integers(1, 80), seed=st.integers(0, 9))
def test_a_capped_evaluation_keeps_every_pair_of_the_users_it_samples(users: list[int], cap: int, seed: int):
    test_user = np.array(users, dtype=np.int64)
    test_item = np.arange(len(users), dtype=np.int64)
    u, i = evaluated_pairs(_split(test_user, test_item), cap, seed)
    chosen = set(u.tolist())
    assert len(chosen) == min(cap, len(set(users)))
    # All of a sampled user's held-out pairs, none of anyone else's, and the same sample for the same seed.
    assert sorted(i.tolist()) == [k for k, user in enumerate(users) if user in chosen]
    assert np.array_equal(u, evaluated_pairs(_split(test_user, test_item), cap, seed)[0])
    assert np.array_equal(evaluated_pairs(_split(test_user, test_item), None, seed)[0], test_user)


def test_batches_shrink_so_that_a_million_items_fit(monkeypatch) -> None:
    """Scores come in batches of at most MAX_BATCH_SCORES, whatever batch the caller asks for."""
    items, users = 3_000, 50
    asked = []
    train = csr_from_pairs(np.arange(users), np.arange(users), users, items)
    test = csr_from_pairs(np.arange(users), np.arange(users) + 1, users, items)

    def scores(batch: torch.Tensor) -> torch.Tensor:
        asked.append(len(batch))
        return torch.zeros(len(batch), items)

    monkeypatch.setattr(metrics, "MAX_BATCH_SCORES", 10 * items)
    metrics.recall_ndcg_at_k(scores, train, test, 20, batch_users=1024)
    assert max(asked) == 10 and sum(asked[1:]) == users  # one probe of one user, then batches of 10


def test_the_scale_bench_graph_is_read_as_an_ingested_one_and_workers_load_it_slim(tmp_path: Path) -> None:
    made = synthetic_graph(tmp_path, users=500, items=400, events=20_000, days=10)
    full = load_graph(Storage(str(tmp_path)))
    slim = load_graph(Storage(str(tmp_path)), evidence=False)
    assert len(full.ui_user) == made["pairs"] and full.num_items == 400 and full.num_categories == 5_000
    assert full.ui_event_counts is not None and slim.ui_event_counts is None and slim.ui_count is None
    assert np.array_equal(full.ui_user, slim.ui_user) and np.array_equal(full.ui_first_ts, slim.ui_first_ts)
    assert load_graph(Storage(str(tmp_path)), evidence=False, event_counts=True).ui_event_counts is not None
    sp = split(slim, "auto", 1.0)
    assert sp.mode == "last_days" and len(sp.test_user) > 0
    assert (full.ui_event_counts.sum(axis=1) == full.ui_count).all()
