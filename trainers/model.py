"""LightGCN-style encoder over the homogeneous interest graph (pure torch, no Ray)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from trainers.propagation import SidePlan


class _SymmetricSpMM(torch.autograd.Function):
    """``adj @ x`` whose backward reuses ``adj`` because ``adj`` is symmetric (adj^T == adj).

    torch's own backward for CSR @ dense transposes the matrix on every call, which made a
    full-graph step about twice as slow at Gowalla size. No gradient flows into ``adj``: the
    normalised adjacency is a constant of the model.
    """

    @staticmethod
    def forward(ctx, adj: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.adj = adj
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        return None, torch.sparse.mm(ctx.adj, grad_out)


class LightConv(torch.nn.Module):
    """Parameter-free LightGCN layer: x' = A_hat x with A_hat a pre-normalised symmetric adjacency.

    A plain module rather than a PyG ``MessagePassing``: the layer is one sparse product, and PyG's wrapper added
    nothing but a COO expansion of the CSR on every call (~5 ms per layer at Gowalla size) and about 2.7 s of
    import to every process that builds the model (each Ray Train worker, at every run and update).
    """

    def forward(self, x: Tensor, adj_t: Tensor) -> Tensor:
        return _SymmetricSpMM.apply(adj_t, x)


class InterestGCN(torch.nn.Module):
    """LightGCN: one embedding table over all node types, K propagation layers, mean readout."""

    def __init__(self, num_nodes: int, embedding_dim: int = 64, num_layers: int = 3, initialise: bool = True
                 ) -> None:
        """`initialise=False` leaves the table unfilled, for a caller that fills it (a warm start's state, the filter
        start, or `reset_parameters`): filling a 59k x 1,024 table at random twice cost each worker half a second a
        cycle."""
        super().__init__()
        if num_nodes <= 0 or embedding_dim <= 0 or num_layers < 0:
            raise ValueError("num_nodes and embedding_dim must be positive, num_layers non-negative")
        self.num_nodes = num_nodes
        self.embedding_dim = embedding_dim
        self.num_layers = num_layers
        self.embedding = torch.nn.Embedding.from_pretrained(torch.empty(num_nodes, embedding_dim), freeze=False)
        if initialise:
            self.reset_parameters()
        self.conv = LightConv()
        # Not in the state dict: a fixed function of the training graph, rebuilt by whoever builds the adjacency.
        self.register_buffer("output_scale", None, persistent=False)
        self.plan: SidePlan | None = None

    def reset_parameters(self) -> None:
        """The random start. Draws what `torch.nn.Embedding`'s own initialisation and then a std 0.1 normal (as in
        LightGCN-PyTorch; the paper's Xavier init is slower to start) drew, so a seed gives the table it always gave."""
        self.embedding.reset_parameters()
        torch.nn.init.normal_(self.embedding.weight, std=0.1)

    def set_output_scale(self, scale: Tensor | None) -> None:
        """Per-node factor on the final embeddings (item degree^power: GF-CF's D^1/2 on the item side), or none."""
        self.output_scale = None if scale is None else scale.to(self.embedding.weight.device)

    def set_plan(self, plan: SidePlan | None) -> None:
        """How propagation without gradients may go through the graph's two sides (`trainers.propagation`); used
        only for the adjacency it was made from."""
        self.plan = plan

    def forward(self, adj: Tensor) -> Tensor:
        """Final embeddings [num_nodes, dim] = mean of layers 0..K (alpha_k = 1/(K+1))."""
        if not torch.is_grad_enabled():
            return self.propagated(adj)[0]
        x = self.embedding.weight
        out = x
        for _ in range(self.num_layers):
            x = self.conv(x, adj)
            out = out + x
        out = out / (self.num_layers + 1)
        return out if self.output_scale is None else out * self.output_scale.unsqueeze(1)

    @torch.no_grad()
    def propagated(self, adj: Tensor, keep_deeper: bool = False) -> tuple[Tensor, Tensor | None]:
        """`forward` without autograd, summing into one buffer (each layer's `out + x` was a fresh table, and at
        1,024 dims the page faults of fresh tables were a quarter of an evaluation's propagation); with
        `keep_deeper`, also the sum of layers 1..K-1 (what a mini-batch step reads for its deeper layers)."""
        ego = self.embedding.weight.detach()
        if self.plan is not None and self.plan.adj is adj and self.num_layers >= 1:
            total, deeper = self.plan.propagate(ego, self.num_layers, keep_deeper)
        else:
            x, total, deeper = ego, ego.clone(), None
            for layer in range(1, self.num_layers + 1):
                x = torch.sparse.mm(adj, x)
                total += x
                if keep_deeper and layer == self.num_layers - 1:
                    deeper = total - ego
        final = total.div_(self.num_layers + 1)  # in place: a table-sized block fewer at the peak
        if self.output_scale is not None:
            final.mul_(self.output_scale.unsqueeze(1))
        return final, deeper

    @property
    def ego(self) -> Tensor:
        """Layer-0 embeddings, which the L2 regulariser applies to."""
        return self.embedding.weight
