"""The spectral-filter start: after LightGCN's propagation the model scores exactly the SVD-GCN low-pass filter."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.graph import build_norm_adjacency, node_offsets
from trainers.loop import item_degree_scale
from trainers.model import InterestGCN
from trainers.spectral import (
    GaussianRows,
    _basis,
    _std,
    filter_coefficients,
    interest_block,
    randomized_svd,
    spectral_embeddings,
)

E = np.array([], dtype=np.int64)
USERS, ITEMS, CATS, BRANDS = 40, 30, 4, 3


def _adjacency(seed: int, attributes: bool, exponent: float = 0.5) -> torch.Tensor:
    """A random interest graph where every node has an edge; with `attributes`, items in categories and brands."""
    rng = np.random.default_rng(seed)
    u, i = rng.integers(0, USERS, 300), rng.integers(0, ITEMS, 300)
    u, i = np.concatenate([u, np.arange(USERS), np.arange(ITEMS) % USERS]), np.concatenate(
        [i, np.arange(USERS) % ITEMS, np.arange(ITEMS)])
    items = np.arange(ITEMS)
    ic, ib = ((items, items % CATS), (items[::2], items[::2] % BRANDS)) if attributes else ((E, E), (E, E))
    return build_norm_adjacency(USERS, ITEMS, CATS if attributes else 0, BRANDS if attributes else 0, u, i,
                                rng.uniform(1, 8, len(u)).astype(np.float32), *ic, *ib, exponent=exponent)


def test_the_interest_block_is_the_adjacency_between_items_and_every_other_node():
    adj = _adjacency(0, attributes=True)
    off = node_offsets(USERS, ITEMS, CATS, BRANDS)
    dense = adj.to_dense().numpy()
    others = np.r_[0:USERS, off.category : off.num_nodes]
    np.testing.assert_allclose(interest_block(adj, off).toarray(), dense[others][:, off.item : off.category])
    # Bipartite: nothing else is connected, so the block's singular pairs are the adjacency's eigenpairs.
    items = slice(off.item, off.category)
    assert np.abs(dense[others][:, others]).sum() == 0 and np.abs(dense[items, items]).sum() == 0


def test_randomized_svd_finds_the_top_singular_values():
    block = interest_block(_adjacency(0, attributes=True), node_offsets(USERS, ITEMS, CATS, BRANDS))
    _, sigma, _ = randomized_svd(block, 8, iterations=6)
    exact = np.linalg.svd(block.toarray(), compute_uv=False)[:8]
    np.testing.assert_allclose(sigma, exact, rtol=1e-3)


@pytest.mark.parametrize("shape", [(60, 25), (25, 60)])
def test_randomized_svd_returns_singular_pairs_on_either_side(shape):
    """Wide or tall, u and v come back orthonormal and paired (u^T A v is diagonal with sigma on it)."""
    rng = np.random.default_rng(3)
    m = sp.random(*shape, density=0.3, random_state=rng, format="csr", dtype=np.float32)
    u, sigma, v = randomized_svd(m, 10, iterations=8)
    assert u.shape == (shape[0], 10) and v.shape == (shape[1], 10)
    np.testing.assert_allclose(sigma, np.linalg.svd(m.toarray(), compute_uv=False)[:10], rtol=1e-3)
    np.testing.assert_allclose(u.T @ u, np.eye(10), atol=1e-4)
    np.testing.assert_allclose(v.T @ v, np.eye(10), atol=1e-4)
    np.testing.assert_allclose(u.T @ (m @ v), np.diag(sigma), atol=1e-4 * sigma[0])


@pytest.mark.parametrize("shape", [(12, 9), (9, 12)])
def test_randomized_svd_above_the_rank_gives_zero_vectors_not_nan(shape):
    """A block of rank 2 asked for 5 pairs, wide or tall: the three it does not have come back with sigma about 0
    and a zero vector on one side, so they add nothing to a filter's scores."""
    rng = np.random.default_rng(4)
    m = sp.csr_matrix((rng.random((shape[0], 2)) @ rng.random((2, shape[1]))).astype(np.float32))
    u, sigma, v = randomized_svd(m, 5, iterations=3)
    assert np.isfinite(u).all() and np.isfinite(v).all()
    assert (sigma[2:] < 1e-3 * sigma[0]).all()
    assert min(np.abs(u[:, 2:]).max(axis=0).max(), np.abs(v[:, 2:]).max(axis=0).max()) == 0
    np.testing.assert_allclose((u * sigma) @ v.T, m.toarray(), atol=1e-4)


@pytest.mark.parametrize("rows", [(1, 1), (3, 5000), (4097, 2), (0, 7)])
def test_the_spread_of_two_tables_is_their_concatenation_s(rows):
    rng = np.random.default_rng(rows[0])
    parts = [rng.normal(0.3, 2.0, (n, 5)).astype(np.float32) for n in rows]
    assert _std(*parts) == pytest.approx(float(np.concatenate(parts).astype(np.float64).std()), rel=1e-9)


def test_a_filter_start_as_wide_as_the_table_draws_no_random_numbers(monkeypatch):
    """Every node is a row of the item block, so with as many singular pairs as dimensions the filter fills the
    whole table: a random fill would be thrown away. Narrower blocks still fill the rest at random."""
    adj, off = _adjacency(0, attributes=True), node_offsets(USERS, ITEMS, CATS, BRANDS)
    expected = spectral_embeddings(adj, off, 16, filter_beta=3.0, num_layers=3)

    def no_draws(*args, **kwargs):
        raise AssertionError("a random fill of a table that is overwritten")

    monkeypatch.setattr(np.random, "default_rng", no_draws)
    assert torch.equal(spectral_embeddings(adj, off, 16, filter_beta=3.0, num_layers=3), expected)
    assert float(expected.std(unbiased=False)) == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(AssertionError, match="random fill"):
        spectral_embeddings(adj, off, ITEMS + 5, filter_beta=3.0, num_layers=3)


@pytest.mark.parametrize("layers, beta, attributes, exponent", [
    (0, 2.0, False, 0.5), (3, 3.0, False, 0.5), (2, 0.0, False, 0.5), (3, 3.5, True, 0.5), (3, 3.5, True, 0.4)])
def test_filter_start_scores_the_low_pass_filter_after_propagation(layers, beta, attributes, exponent):
    """Users and categories against items, on the weighted heterogeneous graph and under the generalised
    normalisation: after the model's own propagation, scores are sum_k u_k exp(beta sigma_k / sigma_1) v_k."""
    k = 12
    off = node_offsets(USERS, ITEMS, CATS if attributes else 0, BRANDS if attributes else 0)
    adj = _adjacency(1, attributes, exponent)
    emb = spectral_embeddings(adj, off, k, filter_beta=beta, num_layers=layers, iterations=12)
    model = InterestGCN(off.num_nodes, k, layers)
    with torch.no_grad():
        model.embedding.weight.copy_(emb)
        out = model(adj).double().numpy()
    others = np.r_[0:USERS, off.category : off.num_nodes]
    got = out[others] @ out[off.item : off.category].T
    lu, sigma, lv = randomized_svd(interest_block(adj, off), k, iterations=12)
    want = (lu * np.exp(beta * sigma / sigma.max())) @ lv.T
    # Equal up to the start's overall scale, which only sets the learning rate's meaning.
    scale = float((got * want).sum() / (want * want).sum())
    np.testing.assert_allclose(got, scale * want, atol=1e-4 * np.abs(scale * want).max())


@pytest.mark.parametrize("top", [1.0, 1.6])
def test_filter_coefficients_undo_the_mean_readout(top):
    sigma = np.array([top, 0.5, 0.1])
    a = filter_coefficients(sigma, 2.0, 3)
    readout = (1 + sigma + sigma**2 + sigma**3) / 4
    np.testing.assert_allclose((a * readout) ** 2, np.exp(2.0 * sigma / top))


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


def test_rank_zero_runs_the_svd_on_the_threads_of_the_ranks_waiting_on_its_node(monkeypatch, tmp_path):
    """The other ranks wait in the broadcast; rank 0 takes their threads for the SVD and gives them back after."""
    from core.config import TrainConfig
    from trainers import loop

    seen = []
    off = node_offsets(USERS, ITEMS, CATS, BRANDS)
    real = loop.spectral_embeddings

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "spectral_embeddings", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hp = TrainConfig(embedding_dim=8, spectral_filter=3.5)
        expected = real(_adjacency(0, attributes=True), off, 8, seed=hp.seed, filter_beta=3.5,
                        num_layers=hp.num_layers)
        for local_world in (1, 2):
            session = loop.LocalSession(out_dir=str(tmp_path), local_world=local_world)
            table = torch.full((off.num_nodes, 8), float("nan"))
            loop._spectral_start(_adjacency(0, attributes=True), off, hp, session, torch.device("cpu"), table)
            assert torch.equal(table, expected) and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]


@pytest.mark.parametrize("dim", [8, 16, ITEMS + 5])
@pytest.mark.parametrize("beta", [None, 3.0])
def test_a_start_written_into_a_given_table_is_the_same_to_the_bit(dim, beta):
    """The start computed into a model's own table (no table-sized blocks of its own) equals the one it allocates,
    whether the singular vectors fill the table (8, 16) or not (wider than the block's rank: the rest drawn at
    random); the table given is the one returned."""
    adj, off = _adjacency(0, attributes=True), node_offsets(USERS, ITEMS, CATS, BRANDS)
    expected = spectral_embeddings(adj, off, dim, seed=3, filter_beta=beta, num_layers=3)
    table = torch.full((off.num_nodes, dim), float("nan"))
    got = spectral_embeddings(adj, off, dim, seed=3, filter_beta=beta, num_layers=3, out=table)
    assert got is table and torch.equal(table, expected)


@pytest.mark.parametrize("bad", [lambda n: torch.empty(n, 9), lambda n: torch.empty(n, 8, dtype=torch.float64),
                                 lambda n: torch.empty(8, n).T])
def test_a_table_of_another_shape_type_or_layout_is_refused_before_the_svd(bad):
    adj, off = _adjacency(0, attributes=True), node_offsets(USERS, ITEMS, CATS, BRANDS)
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor"):
        spectral_embeddings(adj, off, 8, filter_beta=3.0, num_layers=3, out=bad(off.num_nodes))



@pytest.mark.parametrize("shape", [(30, 200), (60, 25)])
def test_randomized_svd_through_the_rows_gram_finds_the_same_pairs(shape):
    """A A^T given (one product over the rows per power instead of two through the columns): the same subspace,
    so the same singular values and the same filter, within float32 rounding."""
    rng = np.random.default_rng(6)
    m = sp.random(*shape, density=0.05, random_state=rng, format="csr", dtype=np.float32)
    u, sigma, v = randomized_svd(m, 10, iterations=3)
    gu, gsigma, gv = randomized_svd(m, 10, iterations=3, aat=sp.csr_matrix((m @ m.T).astype(np.float64)))
    np.testing.assert_allclose(gsigma, sigma, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose((gu * gsigma) @ gv.T, (u * sigma) @ v.T, atol=1e-4)


def test_the_basis_between_powers_spans_what_it_is_given():
    """The LU factor with its rows put back: y = basis @ U for an upper-triangular U, columns independent."""
    y = torch.from_numpy(np.random.default_rng(7).standard_normal((40, 12)).astype(np.float32))
    basis = _basis(y, orthonormal=False)
    coef = torch.linalg.lstsq(basis, y).solution
    torch.testing.assert_close(basis @ coef, y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(coef, coef.triu(), rtol=0, atol=1e-4)  # P L U: the coefficients are U
    assert torch.linalg.matrix_rank(basis) == 12
    assert not torch.allclose(basis.T @ basis, torch.eye(12), atol=1e-3)  # not a QR in disguise
    q = _basis(y, orthonormal=True)
    torch.testing.assert_close(q.T @ q, torch.eye(12), rtol=0, atol=1e-5)


def test_an_exactly_zero_pivot_falls_back_to_a_qr():
    """A direction the block does not reach (a power of a rank-deficient block) makes the LU's pivot exactly zero."""
    y = torch.from_numpy(np.random.default_rng(8).standard_normal((10, 4)).astype(np.float32))
    y[:, 3] = 0.0  # rank 3: the fourth pivot is zero, whatever the rounding
    basis = _basis(y, orthonormal=False)
    assert torch.isfinite(basis).all()
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), rtol=0, atol=1e-5)


def test_a_block_with_an_empty_row_and_as_many_pairs_as_it_has_rows_less_one():
    """k = rows - 1 with an edgeless node: the powers meet a zero pivot, and the SVD still comes back whole."""
    rng = np.random.default_rng(9)
    dense = rng.random((6, 40)).astype(np.float32)
    dense[2] = 0.0
    u, sigma, v = randomized_svd(sp.csr_matrix(dense), 5, iterations=3)
    assert np.isfinite(u).all() and np.isfinite(v).all()
    np.testing.assert_allclose(sigma[:5], np.linalg.svd(dense, compute_uv=False)[:5], rtol=1e-3, atol=1e-5)


def _fresh(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(calls=st.lists(st.tuples(st.integers(1, 300), st.sampled_from([16, 32, 80, 1280, 20]), st.integers(0, 2)),
                      min_size=1, max_size=6))
def test_a_kept_draw_is_the_fresh_draw_of_every_call(calls):
    """Items only grow, but any sequence of sizes (a smaller graph after a larger one too), widths (one not a
    multiple of 16 among them) and seeds gets exactly torch.randn's matrix for that call."""
    draws = GaussianRows()
    for n, width, seed in calls:
        assert torch.equal(draws.draw(n, width, seed), _fresh(n, width, seed))


def test_a_kept_draw_is_drawn_afresh_for_another_width_or_seed_or_past_its_bound():
    draws = GaussianRows(max_bytes=112 * 32 * 4)  # 100 rows and their eighth more
    assert torch.equal(draws.draw(50, 32, 0), _fresh(50, 32, 0))
    assert torch.equal(draws.draw(60, 32, 1), _fresh(60, 32, 1))  # another seed
    assert torch.equal(draws.draw(60, 48, 1), _fresh(60, 48, 1))  # another width
    assert draws._key == (48, 1)
    assert torch.equal(draws.draw(70, 18, 1), _fresh(70, 18, 1))  # not a multiple of 16: not kept
    assert torch.equal(draws.draw(101, 32, 1), _fresh(101, 32, 1))  # past the bound: not kept
    assert draws._rows.numel() == 0


def test_the_svd_with_a_kept_draw_is_the_svd_without():
    rng = np.random.default_rng(10)
    draws = GaussianRows()
    for cols in (200, 220, 260):  # the second grows within the room kept, the third past it
        m = sp.random(60, cols, density=0.05, random_state=rng, format="csr", dtype=np.float32)
        expected = randomized_svd(m, 24, iterations=3, seed=4)  # a sketch 32 wide: kept
        for got, want in zip(randomized_svd(m, 24, iterations=3, seed=4, draws=draws), expected, strict=True):
            np.testing.assert_array_equal(got, want)
        assert draws._drawn == cols and draws._key == (32, 4)


def test_a_kept_draw_grows_in_place_by_up_to_an_eighth():
    """A day's new items are drawn into the room kept for them, not into a fresh copy of the whole matrix."""
    draws = GaussianRows()
    first = draws.draw(800, 16, 0)
    grown = draws.draw(900, 16, 0)
    assert grown.data_ptr() == first.data_ptr()
    assert torch.equal(grown, _fresh(900, 16, 0))
    assert draws.draw(901, 16, 0).data_ptr() != first.data_ptr()  # past the room: a larger buffer
