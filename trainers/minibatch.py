"""Training steps whose cost follows the batch, not the graph.

A full-graph step propagates every node through every layer: 34 s at 1M users, 1M items and 50M events on two
cores, whatever the batch. Here a step computes the final embeddings of the batch's nodes only:

    z_B = (E_B + A_B (E + S)) / (L + 1),    S = A E_h + ... + A^(L-1) E_h

The first layer is live (gradients reach the batch's nodes and their sampled neighbours), the deeper layers come
from `S`, propagated from a stored copy `E_h` of the table and refreshed a few times per pass (LTGNN, Zhang et al.
WWW 2024: one propagation layer per step over historical embeddings). With `E_h == E` this is exactly the model's
mean readout, so evaluation and export keep the full propagation and score the same function. A node with more
neighbours than the fan-out has them sampled uniformly with replacement and reweighted (an unbiased estimate of its
row), so a popular item costs no more than a quiet one. A step touches a few rows of the table: its gradient is
sparse, exchanged between ranks as rows (not a dense all-reduce of the whole table) and applied by a lazy Adam, each
row by the one rank that owns it (`owner`), which then sends the row's new value to the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
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


def _csr(row: np.ndarray, col: np.ndarray, weight: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A CSR matrix of these entries (counting sort: linear in the entries, no comparison sort)."""
    return sp.csr_matrix((weight, (row, col)), shape=shape)


def _torch_csr(m: sp.csr_matrix, device: torch.device) -> Tensor:
    return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                   torch.from_numpy(m.indices.astype(np.int64)),
                                   torch.from_numpy(m.data.astype(np.float32)), size=m.shape,
                                   check_invariants=False).to(device)


def compact(ids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct ids, ascending; each id's position among them): np.unique's answer without its sort, by a
    mark per possible id, linear in `size` + len(ids)."""
    mark = np.zeros(size, dtype=bool)
    mark[ids] = True
    return np.flatnonzero(mark), (np.cumsum(mark) - 1)[ids]


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
    """One full propagation without gradients: a forward pass over the graph, a few times per pass over the pairs."""
    final, deeper = model.propagated(adj, keep_deeper=True)
    return History(deeper=deeper, final=final)


@dataclass
class Batch:
    """One step's view of the table: the rows it reads (`index`: the batch's nodes and their sampled neighbours,
    sorted) as a leaf that collects the step's gradient, and the final and layer-0 embeddings of the batch's nodes."""

    index: Tensor
    leaf: Tensor
    out: Tensor
    ego: Tensor


def batch_output(model: InterestGCN, history: History, rows: NeighbourRows, nodes: np.ndarray,
                 rng: np.random.Generator, device: torch.device) -> Batch:
    """Final embeddings of `nodes` (sorted, unique): one live layer over sampled neighbours, deeper layers from
    `history`. The rows read are gathered once into a leaf tensor, so the gradient is theirs alone, dense."""
    table = model.embedding.weight
    if model.num_layers == 0:
        index = torch.from_numpy(nodes).to(device)
        leaf = table.detach()[index].requires_grad_(True)
        out = ego = leaf
    else:
        row, col, weight = rows.sample(nodes, rng)
        index_np, position = compact(np.concatenate([nodes, col]), table.shape[0])
        index = torch.from_numpy(index_np).to(device)
        leaf = table.detach()[index].requires_grad_(True)
        x = leaf if history.deeper is None else leaf + history.deeper[index]
        by_row = _csr(row, position[len(nodes) :], weight, (len(nodes), len(index_np)))
        ego = leaf[torch.from_numpy(position[: len(nodes)]).to(device)]
        layer = _RowsTimes.apply(_torch_csr(by_row, device), _torch_csr(by_row.T.tocsr(), device), x)
        out = (ego + layer) / (model.num_layers + 1)
    if model.output_scale is not None:
        out = out * model.output_scale[torch.from_numpy(nodes).to(device)].unsqueeze(1)
    return Batch(index=index, leaf=leaf, out=out, ego=ego)


def _all_gather_rows(index: Tensor, values: Tensor, world: int) -> list[tuple[Tensor, Tensor]]:
    """Every rank's (row indices, their values), this rank's included, in rank order: an all-gather of indices and
    values padded to the longest; each block is sliced back to its sender's size (the padding is never read)."""
    size = torch.tensor([len(index)], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    real = [int(n) for n in sizes]
    longest = max(real)
    pad_index, pad_values = index.contiguous(), values.contiguous()
    if len(index) < longest:
        pad_index = torch.cat([pad_index, index.new_empty(longest - len(index))])
        pad_values = torch.cat([pad_values, values.new_empty((longest - len(index), values.shape[1]))])
    all_index = [torch.empty_like(pad_index) for _ in range(world)]
    all_values = [torch.empty_like(pad_values) for _ in range(world)]
    dist.all_gather(all_index, pad_index)
    dist.all_gather(all_values, pad_values)
    return [(i[:n], v[:n]) for i, v, n in zip(all_index, all_values, real, strict=True)]


def owner(rows: Tensor, world: int) -> Tensor:
    """The rank that moves each row (and keeps its Adam moments): balanced, and known to every rank unasked."""
    return rows % world


def exchange_rows(index: Tensor, grad: Tensor, frozen: Tensor | None, world: int) -> tuple[Tensor, Tensor]:
    """The gradient of the rows this rank owns (`owner`), summed over ranks and averaged, without the
    rows a warm start must not move. With one rank it owns every row.

    Ranks exchange only the rows they read (`_all_gather_rows`), where a dense all-reduce would move and sum the
    whole table. Each rank then moves only its own rows (`RowAdam`) and sends their new values to the others
    (`share_rows`): at 1M users a step's rows are about half the table, and every rank running Adam over all of
    them was a quarter of a 2-rank step, the same work done twice.
    """
    if frozen is not None:
        keep = ~frozen[index]
        index, grad = index[keep], grad[keep]
    if world == 1:
        return index, grad
    rank = dist.get_rank()
    parts = []
    for i, g in _all_gather_rows(index, grad, world):
        mine = torch.nonzero(owner(i, world) == rank).squeeze(1)
        parts.append((i[mine], g.index_select(0, mine)))
    rows, where = torch.unique(torch.cat([i for i, _ in parts]), return_inverse=True)
    summed = torch.zeros((len(rows), grad.shape[1]), dtype=grad.dtype, device=grad.device)
    start = 0
    for i, g in parts:  # slices of one index, not a boolean mask over every gathered row (a copy of all of them)
        summed.index_put_((where[start : start + len(i)],), g, accumulate=True)
        start += len(i)
    return rows, summed.mul_(1.0 / world)


@torch.no_grad()
def share_rows(table: Tensor, rows: Tensor, world: int) -> None:
    """After each rank moved the rows it owns (`rows`, from `exchange_rows`), every rank copies in the others' new
    values, so the replicas of the table are the same again."""
    if world == 1:
        return
    rank = dist.get_rank()
    for r, (i, v) in enumerate(_all_gather_rows(rows, table.detach()[rows], world)):
        if r != rank:
            table.data.index_copy_(0, i, v)


class RowAdam(torch.optim.Optimizer):
    """Adam over the rows of an embedding table, lazily: a step moves the rows given (and their moments) and leaves
    every other row where it is (as torch's SparseAdam, without its masking passes: the rows come unique)."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None, rows: tuple[Tensor, Tensor] | None = None) -> None:  # type: ignore[override]
        """One step for the (only) table: `rows` = (unique row indices, their gradient [rows, dim])."""
        if rows is None:
            raise ValueError("RowAdam.step needs rows=(index, grad)")
        index, grad = rows
        group = self.param_groups[0]
        table = group["params"][0]
        state = self.state[table]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(table)
            state["exp_avg_sq"] = torch.zeros_like(table)
        state["step"] += 1
        b1, b2 = group["betas"]
        m = state["exp_avg"][index].mul_(b1).add_(grad, alpha=1 - b1)
        v = state["exp_avg_sq"][index].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        state["exp_avg"][index] = m
        state["exp_avg_sq"][index] = v
        step = float(state["step"])
        denom = (v / (1 - b2**step)).sqrt_().add_(group["eps"])
        table.index_add_(0, index, m.div_(denom), alpha=-group["lr"] / (1 - b1**step))

    @torch.no_grad()
    def gather_moments(self, world: int) -> None:
        """Every rank's moments made whole (all ranks call it): each rank moved only the moments of the rows it owns
        (`exchange_rows`), so a checkpoint, written by rank 0, needs the others' rows from them."""
        if world == 1 or not self.state:
            return
        state = self.state[self.param_groups[0]["params"][0]]
        # Rows another rank owns hold a stale copy here (or zeros): zeroed, so the sum is the owner's value.
        others = owner(torch.arange(len(state["exp_avg"]), device=state["exp_avg"].device), world) != dist.get_rank()
        for key in ("exp_avg", "exp_avg_sq"):
            state[key][others] = 0.0
            dist.all_reduce(state[key])
