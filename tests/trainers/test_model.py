import numpy as np
import pytest
import torch

from trainers.graph import build_norm_adjacency, node_offsets
from trainers.losses import bpr_loss, l2_reg
from trainers.model import InterestGCN
from trainers.sampling import NegativeSampler, csr_from_pairs, iter_bpr_batches

I64 = np.int64

# 2 users, 2 items, 1 category, 1 brand -> nodes u0 u1 | i0 i1 | c0 | b0 = 0 1 | 2 3 | 4 | 5
# edges: u0-i0 (given twice: weights 1 and 2), u0-i1 (1), u1-i1 (1), i0-c0, i1-c0, i1-b0
TINY = dict(
    num_users=2,
    num_items=2,
    num_categories=1,
    num_brands=1,
    ui_user=np.array([0, 0, 0, 1], dtype=I64),
    ui_item=np.array([0, 0, 1, 1], dtype=I64),
    ui_weight=np.array([1, 2, 1, 1], dtype=np.float32),
    ic_item=np.array([0, 1], dtype=I64),
    ic_cat=np.array([0, 0], dtype=I64),
    ib_item=np.array([1], dtype=I64),
    ib_brand=np.array([0], dtype=I64),
)


def _expected_dense(w00: float, w: float = 1.0) -> torch.Tensor:
    a = torch.zeros(6, 6)
    for i, j, weight in [(0, 2, w00), (0, 3, w), (1, 3, w), (2, 4, 1), (3, 4, 1), (3, 5, 1)]:
        a[i, j] = a[j, i] = weight
    d = a.sum(1).pow(-0.5)
    return d[:, None] * a * d[None, :]


def test_offsets():
    off = node_offsets(2, 3, 4, 5)
    assert (off.user, off.item, off.category, off.brand, off.num_nodes) == (0, 2, 5, 9, 14)


# weighted: log2(1 + (1 + 2)) = 2 and log2(1 + 1) = 1 twice, scaled to mean 1 over the three pairs
@pytest.mark.parametrize("weighted, w00, w", [(False, 1.0, 1.0), (True, 1.5, 0.75)])
def test_tiny_adjacency_matches_hand_built(weighted, w00, w):
    adj = build_norm_adjacency(**TINY, weighted=weighted)
    assert adj.layout == torch.sparse_csr and adj.dtype == torch.float32
    dense = adj.to_dense()
    assert torch.allclose(dense, dense.T)
    assert torch.allclose(dense, _expected_dense(w00, w), atol=1e-6)
    # D^-1/2 A D^-1/2 has sqrt(deg) as eigenvector with eigenvalue 1 (rows "normalised" in this sense)
    sqrt_deg = torch.tensor([w00 + w, w, w00 + 1, 2 * w + 2, 2, 1]).sqrt()
    assert torch.allclose(dense @ sqrt_deg, sqrt_deg, atol=1e-6)
    # unweighted: entry (u1, i1) = 1/sqrt(deg(u1) deg(i1)) = 1/sqrt(1*4)
    if not weighted:
        assert dense[1, 3].item() == pytest.approx(0.5)


def test_isolated_nodes_and_random_graph_symmetry():
    rng = np.random.default_rng(0)
    nu, ni, nc, nb = 50, 40, 5, 7  # some brands/users will have no edges
    adj = build_norm_adjacency(
        nu,
        ni,
        nc,
        nb,
        rng.integers(0, nu, 300),
        rng.integers(0, ni, 300),
        rng.uniform(0, 5, 300).astype(np.float32),
        np.arange(ni),
        rng.integers(0, nc, ni),
        rng.integers(0, ni, 3),
        rng.integers(0, nb, 3),
    )
    dense = adj.to_dense()
    assert torch.isfinite(dense).all()
    assert torch.allclose(dense, dense.T)
    assert (dense.diagonal() == 0).all()
    # all blocks except user-item, item-category and item-brand are empty
    off = node_offsets(nu, ni, nc, nb)
    assert dense[: off.item, : off.item].abs().sum() == 0
    assert dense[off.category :, off.category :].abs().sum() == 0
    assert dense[: off.item, off.category :].abs().sum() == 0


def test_forward_shape_and_gradient_matches_dense_reference():
    adj = build_norm_adjacency(**TINY)
    model = InterestGCN(num_nodes=6, embedding_dim=8, num_layers=3)
    out = model(adj)
    assert out.shape == (6, 8)
    target = torch.randn(6, 8)
    (out * target).sum().backward()
    grad = model.embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0

    w = model.embedding.weight.detach().clone().requires_grad_(True)
    dense = adj.to_dense()
    h, acc = w, w
    for _ in range(3):
        h = dense @ h
        acc = acc + h
    ref = acc / 4
    (ref * target).sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(grad, w.grad, atol=1e-5)


def test_propagation_without_gradients_is_the_forward_pass_and_leaves_the_table_alone():
    """Evaluation and export propagate under no_grad, summing into one buffer: the same embeddings as the forward
    pass that trains, with and without the per-node output scale."""
    adj = build_norm_adjacency(**TINY)
    table = torch.randn(6, 8)
    ramp = torch.linspace(0.5, 2.0, 6)
    for layers in (0, 1, 3):
        model = InterestGCN(num_nodes=6, embedding_dim=8, num_layers=layers)
        model.load_state_dict({"embedding.weight": table})
        for scale in (None, ramp):
            model.set_output_scale(scale)
            with torch.no_grad():
                quiet = model(adj)
            assert torch.allclose(quiet, model(adj).detach(), atol=1e-6)
            assert torch.equal(model.embedding.weight.detach(), table)  # never the table itself, even at 0 layers
            assert scale is None or torch.equal(model.output_scale, ramp)
            if layers == 0:
                assert torch.equal(quiet, table if scale is None else table * ramp.unsqueeze(1))


def test_a_model_left_unfilled_draws_nothing_takes_a_state_and_computes_the_same(monkeypatch):
    adj = build_norm_adjacency(**TINY)
    source = InterestGCN(num_nodes=6, embedding_dim=8, num_layers=3)

    def no_draws(*args, **kwargs):
        raise AssertionError("a random fill of a table that is overwritten")

    monkeypatch.setattr(torch.nn.init, "normal_", no_draws)
    with pytest.raises(AssertionError):
        InterestGCN(num_nodes=6, embedding_dim=8, num_layers=3)
    model = InterestGCN(num_nodes=6, embedding_dim=8, num_layers=3, initialise=False)
    monkeypatch.undo()
    assert model.embedding.weight.shape == (6, 8) and model.embedding.weight.requires_grad
    model.load_state_dict(source.state_dict())
    assert torch.equal(model(adj), source(adj))
    model(adj).sum().backward()
    assert model.embedding.weight.grad is not None


def test_the_random_start_is_the_table_a_seed_always_gave():
    torch.manual_seed(7)
    expected = torch.nn.Embedding(10, 4)
    torch.nn.init.normal_(expected.weight, std=0.1)
    torch.manual_seed(7)
    assert torch.equal(InterestGCN(num_nodes=10, embedding_dim=4).embedding.weight, expected.weight)


def test_losses():
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    # pos scores 2, 2; neg 0, 0 -> softplus(-2) each
    assert bpr_loss(u, p, n).item() == pytest.approx(np.log1p(np.exp(-2.0)))
    # 0.5 * (1 + 4 + 4 + 1 + 0) / 2
    assert l2_reg(u, p, n, batch_size=2).item() == pytest.approx(2.5)


def test_bpr_training_separates_two_clusters():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    users_per, items_per = 20, 20
    num_users, num_items = 2 * users_per, 2 * items_per
    cluster_u = np.arange(num_users) // users_per
    cluster_i = np.arange(num_items) // items_per
    # each user interacts with 6 random items of its own cluster; 2 more own-cluster items held out
    tr_u, tr_i, held = [], [], []
    for u in range(num_users):
        own = rng.permutation(np.flatnonzero(cluster_i == cluster_u[u]))
        tr_u += [u] * 6
        tr_i += own[:6].tolist()
        held.append(own[6:8])
    tr_u, tr_i = np.array(tr_u), np.array(tr_i)
    empty = np.array([], dtype=I64)
    adj = build_norm_adjacency(num_users, num_items, 0, 0, tr_u, tr_i, None, empty, empty, empty, empty)
    model = InterestGCN(num_users + num_items, embedding_dim=16, num_layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    csr = csr_from_pairs(tr_u, tr_i, num_users, num_items)
    sampler = NegativeSampler(csr.indptr, csr.indices, num_items)
    for _ in range(40):  # 40 epochs x 4 batches = 160 steps
        for u, p, n in iter_bpr_batches(tr_u, tr_i, sampler, batch_size=64, rng=rng):
            emb = model(adj)
            p, n = p + num_users, n + num_users
            loss = bpr_loss(emb[u], emb[p], emb[n]) + 1e-4 * l2_reg(model.ego[u], model.ego[p], model.ego[n], len(u))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        emb = model(adj)
        scores = emb[:num_users] @ emb[num_users:].T
    # held-out own-cluster items must outrank every other-cluster item on average and per pair
    correct = total = 0
    for u in range(num_users):
        other = np.flatnonzero(cluster_i != cluster_u[u])
        s_held = scores[u, held[u]][:, None]
        s_other = scores[u, other][None, :]
        correct += int((s_held > s_other).sum())
        total += s_held.numel() * s_other.numel()
    assert correct / total > 0.95


def test_event_types_as_relations_normalise_each_by_its_own_degrees():
    """u0 viewed i0 and bought i1, u1 viewed i1 twice: views (weight 1) and purchases (weight 3) are relations of
    their own, so u0's purchase is not diluted by its view and i1's purchase by u1's views."""
    users, items = np.array([0, 0, 1, 1], dtype=I64), np.array([0, 1, 1, 1], dtype=I64)
    counts = np.array([[1, 0], [0, 1], [1, 0], [1, 0]])  # columns: view, purchase; u1-i1 given twice
    adj = build_norm_adjacency(2, 2, 0, 0, users, items, None, np.zeros(0, I64),
                               np.zeros(0, I64), np.zeros(0, I64), np.zeros(0, I64), exponent=0.5,
                               relations=counts, relation_weights=np.array([1.0, 3.0])).to_dense()
    # view degrees: u0 1, u1 1, i0 1, i1 1; purchase degrees: u0 1, i1 1
    want = {(0, 2): 1 / 4, (0, 3): 3 / 4, (1, 3): 1 / 4}  # node ids: u0 u1 | i0 i1 = 0 1 | 2 3
    for (a, b), v in want.items():
        assert adj[a, b].item() == pytest.approx(v) and adj[b, a].item() == pytest.approx(v)
    assert int((adj != 0).sum()) == 2 * len(want)


def test_one_relation_is_the_plain_normalisation():
    rng = np.random.default_rng(3)
    u, i = rng.integers(0, 20, 80), rng.integers(0, 15, 80)
    plain = build_norm_adjacency(20, 15, 0, 0, u, i, None, *[np.zeros(0, I64)] * 4, weighted=False, exponent=0.4)
    by_event = build_norm_adjacency(20, 15, 0, 0, u, i, None, *[np.zeros(0, I64)] * 4, exponent=0.4,
                                    relations=np.ones((80, 1)), relation_weights=np.array([5.0]))
    assert torch.allclose(plain.to_dense(), by_event.to_dense(), atol=1e-6)


def test_uniform_weights_give_the_unweighted_graph_exactly():
    """A log of one event type (every pair the same weight) has the unweighted adjacency, whatever that weight:
    weights set how pairs share a node, not how much interactions outweigh attribute edges."""
    rng = np.random.default_rng(3)
    u, i = rng.integers(0, 30, 200), rng.integers(0, 25, 200)
    u, i = np.unique(np.stack([u, i]), axis=1)
    attrs = [np.arange(25), rng.integers(0, 4, 25), np.arange(0, 25, 2), rng.integers(0, 3, 13)]
    plain = build_norm_adjacency(30, 25, 4, 3, u, i, None, *attrs, weighted=False, exponent=0.4).to_dense()
    for weight in (0.3, 8.0):
        w = np.full(len(u), weight, np.float32)
        weighted = build_norm_adjacency(30, 25, 4, 3, u, i, w, *attrs, weighted=True, exponent=0.4).to_dense()
        assert torch.allclose(weighted, plain, atol=1e-6)
