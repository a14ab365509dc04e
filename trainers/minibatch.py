"""Training steps whose cost follows the batch, not the graph.

A full-graph step propagates every node through every layer: 34 s at 1M users, 1M items and 50M events on two
cores, whatever the batch. Here a step computes the final embeddings of the batch's nodes only:

    z_B = (E_B + A_B (E + S)) / (L + 1),    S = A E_h + ... + A^(L-1) E_h

The first layer is live (gradients reach the batch's nodes and their sampled neighbours), the deeper layers come
from `S`, propagated from a stored copy `E_h` of the table and refreshed a few times per epoch (LTGNN, Zhang et al.
WWW 2024: one propagation layer per step over historical embeddings). With `E_h == E` this is exactly the model's
mean readout, so evaluation and export keep the full propagation and score the same function. A node with more
neighbours than the fan-out has them sampled uniformly with replacement and reweighted (an unbiased estimate of its
row), so a popular item costs no more than a quiet one. A step touches a few rows of the table: its gradient is
sparse, exchanged between ranks as rows (not a dense all-reduce of the whole table) and applied by a lazy Adam.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from trainers.model import InterestGCN


class _RowsTimes(torch.autograd.Function):
    """`rows @ x` for a sparse (batch x neighbours) matrix, with its transpose given for the backward pass: the
    product never materialises one vector per sampled entry (1M entries x 1,024 floats would be 4 GB a step)."""

    @staticmethod
    def forward(ctx, rows: Tensor, rows_t: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rows_t = rows_t
        return torch.sparse.mm(rows, x)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[None, None, Tensor]:  # type: ignore[override]
        return None, None, torch.sparse.mm(ctx.rows_t, grad_out)


def _csr(row: np.ndarray, col: np.ndarray, weight: np.ndarray, shape: tuple[int, int],
         device: torch.device) -> Tensor:
    """A CSR matrix from entries already grouped by row (`col` ascending within a row is not required)."""
    indptr = np.zeros(shape[0] + 1, np.int64)
    np.cumsum(np.bincount(row, minlength=shape[0]), out=indptr[1:])
    return torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(col), torch.from_numpy(weight),
                                   size=shape, check_invariants=False).to(device)


class NeighbourRows:
    """The rows of the normalised adjacency, sampled to at most `fanout` entries per node."""

    def __init__(self, adj: Tensor, fanout: int) -> None:
        adj = adj.cpu()
        self.indptr = adj.crow_indices().numpy().astype(np.int64)
        self.indices = adj.col_indices().numpy()
        self.values = adj.values().numpy()
        self.fanout = int(fanout)

    def sample(self, nodes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(batch row, neighbour node, weight) of the sampled entries of `nodes`' rows, grouped by row."""
        start = self.indptr[nodes]
        degree = self.indptr[nodes + 1] - start
        take = np.minimum(degree, self.fanout)
        row = np.repeat(np.arange(len(nodes), dtype=np.int64), take)
        first = np.cumsum(take) - take
        rank = np.arange(int(take.sum()), dtype=np.int64) - np.repeat(first, take)
        full = np.repeat(degree <= self.fanout, take)
        deg_e, start_e = np.repeat(degree, take), np.repeat(start, take)
        # A full row is read in order; a longer one at `fanout` uniform positions, each standing for deg/fanout.
        offset = np.where(full, rank, (rng.random(len(rank)) * deg_e).astype(np.int64))
        pos = start_e + np.minimum(offset, deg_e - 1)
        weight = self.values[pos] * np.where(full, 1.0, deg_e / self.fanout).astype(np.float32)
        return row, self.indices[pos].astype(np.int64), weight.astype(np.float32)


@dataclass
class History:
    """Propagated embeddings of the stored table: `deeper` = layers 1..L-1 summed (None for L < 2), `final` = the
    model's output as of the refresh (what hard negatives are scored by)."""

    deeper: Tensor | None
    final: Tensor


@torch.no_grad()
def refresh(model: InterestGCN, adj: Tensor) -> History:
    """One full propagation without gradients: a forward pass over the graph, a few times per epoch."""
    ego = model.embedding.weight.detach()
    x, total, deeper = ego, ego.clone(), None
    for layer in range(1, model.num_layers + 1):
        x = torch.sparse.mm(adj, x)
        total += x
        if layer == model.num_layers - 1:
            deeper = total - ego
    final = total / (model.num_layers + 1)
    if model.output_scale is not None:
        final *= model.output_scale.unsqueeze(1)
    return History(deeper=deeper, final=final)


def batch_output(model: InterestGCN, history: History, rows: NeighbourRows, nodes: np.ndarray,
                 rng: np.random.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """Final embeddings of `nodes` (one live layer over sampled neighbours, deeper layers from `history`) and
    their ego rows. Both read the table through sparse lookups, so the table's gradient is sparse."""
    table = model.embedding.weight
    nodes_t = torch.from_numpy(nodes).to(device)
    ego = F.embedding(nodes_t, table, sparse=True)
    if model.num_layers == 0:
        out = ego
    else:
        row, col, weight = rows.sample(nodes, rng)
        uniq, inverse = np.unique(col, return_inverse=True)
        inverse = inverse.reshape(-1)
        uniq_t = torch.from_numpy(uniq).to(device)
        x = F.embedding(uniq_t, table, sparse=True)
        if history.deeper is not None:
            x = x + history.deeper[uniq_t]
        by_row = _csr(row, inverse, weight, (len(nodes), len(uniq)), device)
        order = np.argsort(inverse, kind="stable")
        by_col = _csr(inverse[order], row[order], weight[order], (len(uniq), len(nodes)), device)
        out = (ego + _RowsTimes.apply(by_row, by_col, x)) / (model.num_layers + 1)
    if model.output_scale is not None:
        out = out * model.output_scale[nodes_t].unsqueeze(1)
    return out, ego


def sparse_rows_grad(grad: Tensor, frozen: Tensor | None, world: int) -> Tensor:
    """The table's sparse gradient, coalesced, without the rows a warm start must not move, averaged over ranks.

    Ranks exchange only the rows they touched (an all-gather of indices and values, padded to the longest), which
    at 1M users and items is a few MB per step where a dense all-reduce would move the whole table.
    """
    grad = grad.coalesce()
    index, values = grad.indices()[0], grad.values()
    if frozen is not None:
        keep = ~frozen[index]
        index, values = index[keep], values[keep]
    if world > 1:
        size = torch.tensor([len(index)], device=values.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        longest = int(max(int(s) for s in sizes))
        pad_index = torch.full((longest,), -1, dtype=index.dtype, device=index.device)
        pad_index[: len(index)] = index
        pad_values = torch.zeros((longest, values.shape[1]), dtype=values.dtype, device=values.device)
        pad_values[: len(index)] = values
        all_index = [torch.empty_like(pad_index) for _ in range(world)]
        all_values = [torch.empty_like(pad_values) for _ in range(world)]
        dist.all_gather(all_index, pad_index)
        dist.all_gather(all_values, pad_values)
        index, values = torch.cat(all_index), torch.cat(all_values) / world
        real = index >= 0
        index, values = index[real], values[real]
    return torch.sparse_coo_tensor(index.unsqueeze(0), values, grad.shape, check_invariants=False).coalesce()
