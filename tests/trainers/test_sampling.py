
import numpy as np
import pytest

from trainers.sampling import NegativeSampler, csr_from_pairs, iter_bpr_batches


def _random_csr(rng, num_users, num_items, per_user):
    users = np.repeat(np.arange(num_users), per_user)
    items = rng.integers(0, num_items, size=users.size)
    return csr_from_pairs(users, items, num_users, num_items)


def _is_positive(csr, num_items, users, items):
    keys = np.repeat(np.arange(len(csr.indptr) - 1), np.diff(csr.indptr)) * num_items + csr.indices
    q = users * num_items + items
    pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    return keys[pos] == q


def test_negatives_are_never_positives_and_in_range():
    rng = np.random.default_rng(0)
    num_users, num_items = 300, 50
    csr = _random_csr(rng, num_users, num_items, per_user=30)  # dense: ~45% of items positive
    sampler = NegativeSampler(csr.indptr, csr.indices, num_items)
    users = rng.integers(0, num_users, size=50_000)
    neg = sampler.sample(users, rng)
    assert neg.shape == users.shape
    assert neg.min() >= 0 and neg.max() < num_items
    assert not _is_positive(csr, num_items, users, neg).any()


def test_user_owning_all_but_one_item_gets_that_item():
    num_items = 1000
    items = np.delete(np.arange(num_items), 637)
    csr = csr_from_pairs(np.zeros(items.size, dtype=np.int64), items, 2, num_items)
    sampler = NegativeSampler(csr.indptr, csr.indices, num_items)
    rng = np.random.default_rng(1)
    neg = sampler.sample(np.array([0] * 1000 + [1] * 10), rng)
    assert (neg[:1000] == 637).all()
    assert (neg[1000:] >= 0).all() and (neg[1000:] < num_items).all()


def test_negatives_are_uniform_over_non_positives():
    # positives {0, 2, 5} of 6 items -> negatives {1, 3, 4}, each with probability 1/3
    csr = csr_from_pairs(np.zeros(3, dtype=np.int64), np.array([5, 0, 2]), 1, 6)
    sampler = NegativeSampler(csr.indptr, csr.indices, 6)
    neg = sampler.sample(np.zeros(30_000, dtype=np.int64), np.random.default_rng(2))
    counts = np.bincount(neg, minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert np.allclose(counts[[1, 3, 4]] / neg.size, 1 / 3, atol=0.015)


def test_user_with_every_item_raises():
    csr = csr_from_pairs(np.zeros(4, dtype=np.int64), np.arange(4), 1, 4)
    sampler = NegativeSampler(csr.indptr, csr.indices, 4)
    with pytest.raises(ValueError, match="every item"):
        sampler.sample(np.array([0]), np.random.default_rng(0))


def test_a_large_batch_of_negatives_never_hits_a_positive():
    """100k negatives in one vectorised call (its speed is part of every training step the benchmarks time)."""
    rng = np.random.default_rng(3)
    num_users, num_items = 2000, 3000
    csr = _random_csr(rng, num_users, num_items, per_user=50)
    sampler = NegativeSampler(csr.indptr, csr.indices, num_items)
    users = rng.integers(0, num_users, size=100_000)
    neg = sampler.sample(users, rng)
    assert neg.shape == users.shape and neg.min() >= 0 and neg.max() < num_items
    assert not _is_positive(csr, num_items, users, neg).any()


def test_iter_bpr_batches_covers_each_pair_once():
    rng = np.random.default_rng(4)
    users = np.array([0, 0, 1, 2, 2, 2, 3])
    items = np.array([1, 2, 0, 3, 4, 5, 1])
    csr = csr_from_pairs(users, items, 4, 6)
    sampler = NegativeSampler(csr.indptr, csr.indices, 6)
    batches = list(iter_bpr_batches(users, items, sampler, batch_size=3, rng=rng))
    assert [len(b[0]) for b in batches] == [3, 3, 1]
    seen = sorted((int(u), int(p)) for b in batches for u, p in zip(b[0], b[1], strict=True))
    assert seen == sorted(zip(users.tolist(), items.tolist(), strict=True))
    for u, _, n in batches:
        assert not _is_positive(csr, 6, u.numpy(), n.numpy()).any()
    assert len(list(iter_bpr_batches(users, items, sampler, 3, rng, drop_last=True))) == 2
