"""The spectral-filter start: after LightGCN's propagation the model scores exactly the SVD-GCN low-pass filter."""

import numpy as np
import pytest
import torch

from trainers.graph import build_norm_adjacency, node_offsets
from trainers.loop import item_degree_scale
from trainers.model import InterestGCN
from trainers.spectral import filter_coefficients, normalised_interactions, randomized_svd, spectral_embeddings

E = np.array([], dtype=np.int64)


def _graph(seed: int, users: int = 40, items: int = 30, pairs: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u, i = rng.integers(0, users, pairs), rng.integers(0, items, pairs)
    u, i = np.concatenate([u, np.arange(users), np.arange(items) % users]), np.concatenate(
        [i, np.arange(users) % items, np.arange(items)])  # every node has an edge
    return u, i


def test_randomized_svd_finds_the_top_singular_values():
    u, i = _graph(0)
    m = normalised_interactions(40, 30, u, i)
    _, sigma, _ = randomized_svd(m, 8, iterations=6)
    exact = np.linalg.svd(m.toarray(), compute_uv=False)[:8]
    np.testing.assert_allclose(sigma, exact, rtol=1e-3)


@pytest.mark.parametrize("layers, beta", [(0, 2.0), (3, 3.0), (2, 0.0)])
def test_filter_start_scores_the_low_pass_filter_after_propagation(layers, beta):
    users, items, k = 40, 30, 12
    u, i = _graph(1)
    off = node_offsets(users, items, 0, 0)
    emb = spectral_embeddings(users, items, u, i, E, E, E, E, off, k, filter_beta=beta, num_layers=layers,
                              iterations=8)
    model = InterestGCN(off.num_nodes, k, layers)
    with torch.no_grad():
        model.embedding.weight.copy_(emb)
        adj = build_norm_adjacency(users, items, 0, 0, u, i, None, E, E, E, E, weighted=False)
        out = model(adj).double().numpy()
    got = out[:users] @ out[users:].T
    lu, sigma, lv = randomized_svd(normalised_interactions(users, items, u, i), k, iterations=8)
    want = (lu * np.exp(beta * sigma)) @ lv.T
    # Equal up to the start's overall scale, which only sets the learning rate's meaning.
    scale = float((got * want).sum() / (want * want).sum())
    np.testing.assert_allclose(got, scale * want, atol=1e-4 * np.abs(scale * want).max())


def test_filter_coefficients_undo_the_mean_readout():
    sigma = np.array([1.0, 0.5, 0.1])
    a = filter_coefficients(sigma, 2.0, 3)
    readout = (1 + sigma + sigma**2 + sigma**3) / 4
    np.testing.assert_allclose((a * readout) ** 2, np.exp(2.0 * sigma))


def test_item_degree_scale_multiplies_only_items():
    off = node_offsets(2, 3, 1, 0)
    assert item_degree_scale(off, np.array([0, 0, 0, 1]), 0.0) is None
    scale = item_degree_scale(off, np.array([0, 0, 0, 1]), 0.5).numpy()
    deg = np.array([3.0, 1.0, 1.0])  # an item without pairs counts as degree 1, so it keeps a score
    np.testing.assert_allclose(scale[off.item : off.item + 3], np.sqrt(deg / deg.mean()), rtol=1e-6)
    assert (scale[: off.item] == 1).all() and (scale[off.category :] == 1).all()
    model = InterestGCN(off.num_nodes, 4, 1)
    adj = build_norm_adjacency(2, 3, 1, 0, np.array([0, 1]), np.array([0, 1]), None, np.array([2]),
                               np.array([0]), E, E)
    plain = model(adj)
    model.set_output_scale(torch.from_numpy(scale))
    torch.testing.assert_close(model(adj), plain * torch.from_numpy(scale)[:, None])
    assert "output_scale" not in model.state_dict()
