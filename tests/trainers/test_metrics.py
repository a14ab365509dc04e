import math

import numpy as np
import pytest
import torch

from trainers.metrics import recall_ndcg_at_k, recall_ndcg_from_topk
from trainers.sampling import csr_from_pairs

# 4 users x 6 items, K = 3. Hand computation (D(r) = 1/log2(r + 2) for 0-based rank r):
#   user 0: train {0}, test {1, 3}; scores [9, 1, 8, 7, 2, 0]
#           masked top-3 = [2, 3, 4] -> hits [0, 1, 0]; recall 1/2
#           dcg = D(1) = 1/log2(3) = 0.63093; idcg = D(0) + D(1) = 1.63093; ndcg = 0.38685
#           (unmasked top-3 would be [0, 2, 3] -> dcg 1/log2(4) = 0.5: masking is observable)
#   user 1: train {}, test {5}; scores [0, 1, 2, 3, 4, 5]
#           top-3 = [5, 4, 3] -> hits [1, 0, 0]; recall 1; idcg = D(0) (|test| < K); ndcg 1
#   user 2: train {2, 3}, test {0, 1, 4, 5}; scores [1, 6, 9, 8, 5, 0]
#           masked top-3 = [1, 4, 0] -> hits [1, 1, 1]; recall 3/4; idcg over min(4, 3) = 3 ranks; ndcg 1
#   user 3: train {1}, test {} -> not evaluated
# recall@3 = (0.5 + 1 + 0.75) / 3 = 0.75
# ndcg@3   = (0.386853 + 1 + 1) / 3 = 0.795618
SCORES = torch.tensor(
    [
        [9, 1, 8, 7, 2, 0],
        [0, 1, 2, 3, 4, 5],
        [1, 6, 9, 8, 5, 0],
        [0, 5, 1, 2, 3, 4],
    ],
    dtype=torch.float32,
)
TRAIN = csr_from_pairs(np.array([0, 2, 2, 3]), np.array([0, 2, 3, 1]), num_users=4, num_items=6)
TEST = csr_from_pairs(np.array([0, 0, 1, 2, 2, 2, 2]), np.array([1, 3, 5, 0, 1, 4, 5]), num_users=4, num_items=6)
NDCG0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
EXPECTED = {"recall@3": 0.75, "ndcg@3": (NDCG0 + 2) / 3, "users": 3}


def _scores_fn(users: torch.Tensor) -> torch.Tensor:
    return SCORES[users].clone()  # the evaluator writes -inf into what it gets


def test_hand_values_constant():
    assert NDCG0 == pytest.approx(0.386853, abs=1e-6)
    assert EXPECTED["ndcg@3"] == pytest.approx(0.795618, abs=1e-6)


@pytest.mark.parametrize("batch_users", [1, 2, 1024])
def test_recall_ndcg_at_k_hand_example(batch_users):
    out = recall_ndcg_at_k(_scores_fn, TRAIN, TEST, k=3, batch_users=batch_users)
    assert out["users"] == 3
    assert out["recall@3"] == pytest.approx(EXPECTED["recall@3"])
    assert out["ndcg@3"] == pytest.approx(EXPECTED["ndcg@3"])


def test_masking_changes_result():
    empty_train = csr_from_pairs(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 4, 6)
    out = recall_ndcg_at_k(_scores_fn, empty_train, TEST, k=3, batch_users=2)
    # unmasked: user 0 top-3 [0, 2, 3] -> ndcg 0.5/1.63093; user 2 top-3 [2, 3, 1] -> hit at rank 2 only
    assert out["ndcg@3"] != pytest.approx(EXPECTED["ndcg@3"])
    assert out["recall@3"] == pytest.approx((0.5 + 1 + 0.25) / 3)


def test_from_topk_matches_hand_example():
    topk = np.array([[2, 3, 4], [5, 4, 3], [1, 4, 0], [0, 5, 1]])
    out = recall_ndcg_from_topk(topk, [{1, 3}, {5}, {0, 1, 4, 5}, set()])
    assert out == pytest.approx(EXPECTED)


def test_from_topk_no_hits_is_zero():
    out = recall_ndcg_from_topk(np.array([[0, 1]]), [{2}])
    assert out == {"recall@2": 0.0, "ndcg@2": 0.0, "users": 1}


def test_figures_do_not_depend_on_how_many_users_a_batch_ranks_even_with_tied_scores():
    """`trainers.baselines` ranks popularity (integer counts, many ties) a few users at a time: each user's top-K
    is its own row's, whatever else the batch holds."""
    rng = np.random.default_rng(11)
    users, items = 50, 300
    counts = torch.from_numpy(rng.integers(0, 4, items).astype(np.float32))
    train = csr_from_pairs(rng.integers(0, users, 400), rng.integers(0, items, 400), users, items)
    test = csr_from_pairs(rng.integers(0, users, 200), rng.integers(0, items, 200), users, items)
    results = [recall_ndcg_at_k(lambda b: counts.expand(len(b), -1).clone(), train, test, 20, batch)
               for batch in (1, 7, 64, 1024)]
    for other in results[1:]:
        assert other == pytest.approx(results[0], rel=1e-12)
