"""Propagation through the graph's two sides (`trainers.propagation`) computes what the layer-by-layer loop does."""

import numpy as np
import pytest
import scipy.sparse as sps
import torch

from trainers.graph import build_norm_adjacency, node_offsets
from trainers.model import InterestGCN
from trainers.propagation import SidePlan, side_plan, sparse_gram

E = np.array([], dtype=np.int64)


def _graph(seed: int, users: int, items: int, cats: int, brands: int, pairs: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    u, i = rng.integers(0, users, pairs), rng.integers(0, items, pairs)
    every = np.arange(items)
    ic = (every, every % cats) if cats else (E, E)
    ib = (every[::3], every[::3] % brands) if brands else (E, E)
    return build_norm_adjacency(users, items, cats, brands, u, i, rng.uniform(1, 5, pairs).astype(np.float32),
                                *ic, *ib)


@pytest.mark.parametrize("seed, cats, brands", [(0, 0, 0), (1, 5, 0), (2, 4, 3)])
@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_the_plan_propagates_as_the_loop_does(seed, cats, brands, layers, monkeypatch):
    users, items = 12, 300  # few shoppers, many items: a sparse co-occurrence on the shoppers' side
    adj = _graph(seed, users, items, cats, brands, pairs=400)
    off = node_offsets(users, items, cats, brands)
    plan = side_plan(adj, off.item, off.category)
    assert plan is not None
    table = torch.randn(off.num_nodes, 16, generator=torch.Generator().manual_seed(seed))
    model = InterestGCN(off.num_nodes, 16, layers, initialise=False)
    model.load_state_dict({"embedding.weight": table})
    model.set_output_scale(torch.linspace(0.5, 2.0, off.num_nodes))
    calls = []
    real = SidePlan.propagate
    monkeypatch.setattr(SidePlan, "propagate", lambda self, *a: calls.append(a) or real(self, *a))
    for keep_deeper in (False, True):
        model.set_plan(None)
        loop_final, loop_deeper = model.propagated(adj, keep_deeper=keep_deeper)
        assert not calls
        model.set_plan(plan)
        final, deeper = model.propagated(adj, keep_deeper=keep_deeper)
        assert len(calls) == 1
        calls.clear()
        torch.testing.assert_close(final, loop_final, rtol=1e-5, atol=1e-6)
        assert (deeper is None) == (loop_deeper is None)
        if deeper is not None:
            torch.testing.assert_close(deeper, loop_deeper, rtol=1e-5, atol=1e-6)
        assert torch.equal(model.embedding.weight.detach(), table)


def test_a_plan_serves_only_the_adjacency_it_was_made_from():
    off = node_offsets(12, 300, 4, 0)
    first, second = _graph(0, 12, 300, 4, 0, 400), _graph(1, 12, 300, 4, 0, 400)
    model = InterestGCN(off.num_nodes, 8, 3)
    expected = model.propagated(second)[0]
    model.set_plan(side_plan(first, off.item, off.category))
    torch.testing.assert_close(model.propagated(second)[0], expected, rtol=0, atol=0)


def test_no_plan_when_an_edge_joins_one_side_or_the_co_occurrence_is_dense():
    off = node_offsets(12, 300, 4, 0)
    adj = _graph(0, 12, 300, 4, 0, 400).to_dense()
    adj[0, 1] = adj[1, 0] = 0.1  # two shoppers joined directly: no longer two sides
    assert side_plan(adj.to_sparse_csr(), off.item, off.category) is None
    # 200 shoppers who all bought the same three items: every pair of them co-occurs
    users = np.repeat(np.arange(200), 3)
    dense = build_norm_adjacency(200, 3, 0, 0, users, np.tile(np.arange(3), 200), np.ones(600, np.float32),
                                 E, E, E, E)
    assert side_plan(dense, 200, 203) is None


def test_the_sparse_gram_is_b_b_transposed_or_nothing():
    rng = np.random.default_rng(5)
    b = sps.random(30, 400, density=0.005, random_state=rng, format="csr")
    gram = sparse_gram(b)
    assert gram is not None
    np.testing.assert_allclose(gram.toarray(), (b @ b.T).toarray())
    assert sparse_gram(sps.csr_matrix(np.ones((50, 4)))) is None
    assert sparse_gram(sps.csr_matrix((3, 4))) is None


def test_the_stored_deeper_layers_never_read_the_memory_they_are_written_into(monkeypatch):
    """Fresh tables are not zeroed: filled with NaN here, the plan's sums must still equal the loop's."""
    off = node_offsets(12, 300, 4, 3)
    adj = _graph(3, 12, 300, 4, 3, 400)
    model = InterestGCN(off.num_nodes, 8, 3)
    expected = model.propagated(adj, keep_deeper=True)
    model.set_plan(side_plan(adj, off.item, off.category))
    monkeypatch.setattr(torch, "empty_like", lambda t: torch.full_like(t, float("nan")))
    final, deeper = model.propagated(adj, keep_deeper=True)
    torch.testing.assert_close(final, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deeper, expected[1], rtol=1e-5, atol=1e-6)
