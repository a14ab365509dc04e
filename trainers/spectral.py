"""Spectral initialisation: start the embedding table from the top singular vectors of the normalised graph.

LightGCN's propagation is a low-pass filter on the normalised user-item matrix; its top singular vectors are the
components that filter keeps (the GF-CF / SVD-GCN observation). Starting there instead of from noise gives BPR a
model that already ranks sensibly, which is what makes a CPU time budget enough.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import svds

from trainers.graph import NodeOffsets
from trainers.propagation import side_block, sparse_gram, torch_csr

# A kept draw larger than this is drawn afresh instead: at a million items and 1,024 dimensions it would be 5 GB
# held between cycles. (While it grows, the old rows and the new room are both held for a moment.)
KEEP_MAX_BYTES = 1 << 30


class GaussianRows:
    """The randomized SVD's Gaussian test matrix, `torch.randn(n, width)` from a seeded generator, kept between
    calls by a long-lived worker (`trainers.resident`): it re-filters a graph whose items only grow, and drawing
    the 55,368 x 1,280 matrix afresh was 0.45 s of a Taobao re-filter's 2 s SVD, on one thread.

    Only the rows not drawn before are drawn. torch draws the uniforms in order and turns them into normals 16 at a
    time, so where 16 divides the width, the first n rows of a larger draw are exactly a draw of n rows, and a
    draw continued from the same generator is exactly the rest of a larger one (tested). Other widths, and draws
    past `max_bytes`, are drawn afresh and not kept. The buffer has room for an eighth more rows, so a day's new
    items are drawn into it rather than into a fresh, larger copy (on this VM fresh memory costs 2 s per GB)."""

    def __init__(self, max_bytes: int = KEEP_MAX_BYTES) -> None:
        self._max = max_bytes
        self._key: tuple[int, int] | None = None
        self._generator: torch.Generator | None = None
        self._rows = torch.empty(0, 0)  # room for more rows than drawn
        self._drawn = 0

    def keeps(self, n: int, width: int) -> bool:
        """Whether a draw of n rows of this width would be kept (the others are drawn afresh every time)."""
        return width % 16 == 0 and (n + n // 8) * width * 4 <= self._max

    def draw(self, n: int, width: int, seed: int) -> torch.Tensor:
        """`torch.randn(n, width, generator=torch.Generator().manual_seed(seed))` in float32. Read-only: the rows
        may be kept for the next call."""
        if not self.keeps(n, width):
            self._key, self._generator, self._rows, self._drawn = None, None, torch.empty(0, 0), 0
            return torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        if self._key != (width, seed) or self._generator is None:
            self._key, self._generator = (width, seed), torch.Generator().manual_seed(seed)
            self._rows, self._drawn = torch.empty(0, width), 0
        drawn = self._drawn
        if n > len(self._rows):
            room = torch.empty(n + n // 8, width, dtype=torch.float32)
            room[:drawn] = self._rows[:drawn]
            self._rows = room
        if n > drawn:
            self._rows[drawn:n].normal_(generator=self._generator)
            self._drawn = n
        return self._rows[:n]


def sketch_width(k: int) -> int:
    """Columns of the randomized SVD's test matrix for k pairs: k plus a quarter (at least 8) of oversampling."""
    return k + max(k // 4, 8)


def filter_rank(dim: int, block_rows: int, block_columns: int) -> int:
    """Singular pairs the filter start takes from an item block of this shape for a table `dim` wide."""
    return min(dim, block_rows - 1, block_columns - 1)


def randomized_svd(m: sp.csr_matrix, k: int, iterations: int, seed: int = 0,
                   aat: sp.csr_matrix | None = None, draws: GaussianRows | None = None,
                   v_out: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k (u, sigma, v) of a sparse matrix by subspace iteration (Halko et al. 2011), in torch's threads.

    ARPACK's exact 1,024 vectors of Gowalla take 520 s here; three power iterations take under half a minute, and
    their slightly mixed tail ranked better under the low-pass filter (Recall@20 0.190 against 0.187 exact).

    The basis is kept on the rows' side only and the Rayleigh-Ritz step goes through its small projected Gram
    matrix: orthonormalising the columns' side too (a QR per half-iteration) and a dense SVD of the l x columns
    projection cost 48.5 s of the 3,729 x 55,368 Taobao block and 58.6 s of Gowalla's; this cost 5.9 and 26.9 s
    for the same subspace (range(A A^T q) either way) on one thread, before the changes below. Keeping the basis on
    the shorter side instead would save more on a block with more rows than columns, but the subspace would change:
    one power more on the side the pairs come from ranked Amazon Beauty 1% lower (0.1070 against 0.1081).

    `aat`: A A^T (`trainers.propagation.sparse_gram`, where it is sparse), which makes a power one product over
    the rows instead of two through the columns. Between powers the basis is an LU factor, not a QR (`_basis`).
    `draws`: where the Gaussian test matrix is kept between calls (`GaussianRows`); the same matrix either way.
    `v_out`: a contiguous float32 [columns, k] tensor that v is written into (and returned as a view of).
    """
    a, at = torch_csr(m), torch_csr(m.T.tocsr())
    rows_gram = None if aat is None else torch_csr(aat)

    def power(x: torch.Tensor) -> torch.Tensor:
        return a @ (at @ x) if rows_gram is None else rows_gram @ x

    width = sketch_width(k)
    if draws is None:
        omega = torch.randn(m.shape[1], width, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    else:
        omega = draws.draw(m.shape[1], width, seed)
    q = _basis(a @ omega, orthonormal=iterations == 0)
    del omega
    for it in range(iterations):
        q = _basis(power(q), orthonormal=it == iterations - 1)
    # q^T A A^T q, small; in float64 as it squares the singular values
    small = q.double().T @ power(q).double()
    lam, w = torch.linalg.eigh((small + small.T) / 2)
    lam, w = lam.flip(0)[:k], w.flip(1)[:, :k]
    sigma = lam.clamp(min=0.0).sqrt()
    # A direction the block does not reach (k above its rank) gets a zero vector on the columns' side, not
    # rounding noise divided by a sigma of about 1e-7 (the float32 products set that floor).
    inv = torch.where(sigma > sigma[0] * 1e-4, 1.0 / sigma.clamp(min=1e-30), torch.zeros_like(sigma))
    u = q @ w.float()
    # v = A^T u / sigma through the sparse block: a dense product with the columns' side of the basis took 0.86 s
    # on the Taobao block, this 0.13 s.
    if v_out is None:
        return u.numpy(), sigma.float().numpy(), (at @ (u * inv.float())).numpy()
    # Zeroed first: torch's sparse kernels without MKL scale what is there rather than ignore it (NaN bits stay NaN).
    torch.addmm(v_out.zero_(), at, u * inv.float(), beta=0.0, out=v_out)
    return u.numpy(), sigma.float().numpy(), v_out.numpy()


def _basis(y: torch.Tensor, orthonormal: bool) -> torch.Tensor:
    """A basis of y's columns' span: orthonormal (QR) for the Rayleigh-Ritz step, else the unit lower-triangular
    factor of y's pivoted LU, which keeps the span and the columns apart between powers (Halko et al. 2011, 4.5;
    scikit-learn's power iterations) at a third of a QR's time (3,729 x 1,280: 0.08 s against 0.21-0.31 s). A QR
    where the LU has no such factor: y wider than tall, or an exactly zero pivot (a block of lower rank than the
    basis is wide, as when nodes have no edges or the same neighbours)."""
    if not orthonormal and y.shape[0] > y.shape[1]:
        lu, pivots, info = torch.linalg.lu_factor_ex(y)
        if int(info) == 0:
            lower = lu.tril_(-1)  # in place: one basis-sized copy fewer (1M x 80 at train_scale: 320 MB)
            lower.diagonal().fill_(1.0)
            # LAPACK's pivots swap row i with row pivots[i] - 1, in turn: y[order] = L U, so y U^-1 is L with its
            # rows put back.
            order = np.arange(y.shape[0])
            for i, p in enumerate(pivots.numpy() - 1):
                order[i], order[p] = order[p], order[i]
            basis = torch.empty_like(lower)
            basis[torch.from_numpy(order)] = lower
            return basis
    return torch.linalg.qr(y).Q


def filter_coefficients(sigma: np.ndarray, beta: float, num_layers: int) -> np.ndarray:
    """Per-component scale of both sides' start such that, after `num_layers` of LightGCN propagation and its mean
    readout, a user-item score is sum_k u_k exp(beta sigma_k / sigma_1) v_k: the SVD-GCN filter (Peng et al.,
    CIKM 2022) over singular values relative to the largest (which is 1 under D^-1/2 normalisation, more below it).
    On the bipartite graph one layer multiplies a singular pair by sigma, so the readout multiplies each side by
    p(sigma) = (1 + sigma + ... + sigma^L) / (L + 1); the start divides that out."""
    readout = sum(sigma**layer for layer in range(num_layers + 1)) / (num_layers + 1)
    top = max(float(sigma.max(initial=0.0)), 1e-12)
    return np.exp(0.5 * beta * sigma / top) / readout  # readout >= 1 / (L + 1): sigma is never negative


def interest_block(adj: torch.Tensor, offsets: NodeOffsets) -> sp.csr_matrix:
    """The model's normalised adjacency between items (columns) and every other node (rows: users, then categories,
    then brands). Every edge of the interest graph has an item at one end, so the graph is bipartite and this
    block's singular pairs are the adjacency's eigenpairs: u_k on the other side, v_k on the items, sigma_k."""
    return side_block(adj, offsets.item, offsets.category)


def spectral_embeddings(adj: torch.Tensor, offsets: NodeOffsets, dim: int, std: float = 0.1, seed: int = 0,
                        filter_beta: float | None = None, num_layers: int = 0,
                        iterations: int = 3, draws: GaussianRows | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """[num_nodes, dim] from the top singular pairs of the adjacency's item block (`interest_block`): users,
    categories and brands from the left vectors, items from the right ones. With `filter_beta`, the start is shaped
    so that after `num_layers` of propagation a score is the low-pass filter exp(beta sigma / sigma_1), from a
    randomized SVD; without, each side gets sqrt(sigma) from the exact one.

    `out`: a contiguous float32 CPU table of that shape (a model's own) that the start is written into and returned
    as: the table, the items' vectors and their scaled copies were each a fresh table-sized block (243 MB each on
    Taobao at 1,024 dims), which on a VM costs more to fault in than to compute. The values are the same to the
    bit either way."""
    block = interest_block(adj, offsets)
    k = filter_rank(dim, *block.shape)
    found = k >= 1 and block.nnz > 0
    if out is None:
        table = torch.from_numpy(np.empty((offsets.num_nodes, dim), np.float32))
    elif out.shape != (offsets.num_nodes, dim) or out.dtype != torch.float32 or out.device.type != "cpu" \
            or not out.is_contiguous():
        raise ValueError(f"the start's table must be a contiguous float32 CPU tensor of {(offsets.num_nodes, dim)}, "
                         f"not {out.dtype} {tuple(out.shape)} on {out.device}")
    else:
        table = out
    # Every row is one of the block's, so with k == dim the singular vectors overwrite the whole table, and the
    # random draw (1.4 s of the Taobao start's 7.4) would be thrown away.
    if not (found and k == dim):
        table.numpy()[:] = np.random.default_rng(seed).normal(0.0, std, size=(offsets.num_nodes, dim))
    if not found:
        return table
    items = table[offsets.item : offsets.category]
    if filter_beta is None:
        u, sigma, vt = svds(block.astype(np.float64), k=k, random_state=seed)
        scale = np.sqrt(np.maximum(sigma, 0.0))
        v = vt.T
    else:
        # The items' vectors go straight into their rows where those are whole rows (k == dim, the usual case).
        u, sigma, v = randomized_svd(block, k, iterations, seed, aat=sparse_gram(block), draws=draws,
                                     v_out=items if k == dim else None)
        scale = filter_coefficients(sigma, filter_beta, num_layers)
    # In torch, on the threads it has: numpy did these table-sized passes on one. Each product is the same IEEE
    # float32 multiply either way, and the factor a float32 scalar, so the table is the same to the bit.
    ut, vt_ = torch.from_numpy(np.ascontiguousarray(u)), torch.from_numpy(np.ascontiguousarray(v))
    scale_t = torch.from_numpy(scale.astype(u.dtype))
    ut.mul_(scale_t)
    vt_.mul_(scale_t.to(vt_.dtype))
    # Same overall spread as the default initialisation, so learning rates keep their meaning.
    factor = std / max(_std(ut, vt_), 1e-12)
    ut.mul_(factor)
    vt_.mul_(factor)
    n_users = offsets.item - offsets.user
    table[offsets.user : offsets.item, :k] = ut[:n_users]
    table[offsets.category : offsets.num_nodes, :k] = ut[n_users:]
    if vt_.data_ptr() != items.data_ptr():
        items[:, :k] = vt_
    table[:, k:] *= 0.1
    return table


def _std(*parts: torch.Tensor | np.ndarray) -> float:
    """The standard deviation of the parts' values together (2-d tensors), in float64 and a few thousand rows at a
    time: concatenating them first took two full tables' worth of memory at 1,024 dims. One pass (sum and sum of
    squares): the values are centred near zero, so nothing cancels that float64 would miss."""
    total = square = 0.0
    n = 0
    for p in map(torch.as_tensor, parts):
        for s in range(0, len(p), 4096):
            chunk = p[s : s + 4096].to(torch.float64).reshape(-1)
            total += float(chunk.sum())
            square += float(torch.dot(chunk, chunk))
            n += chunk.numel()
    if n == 0:
        return 0.0
    mean = total / n
    return float(np.sqrt(max(square / n - mean * mean, 0.0)))
