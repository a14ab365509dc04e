"""What every training worker reads and none writes, built once per run and shared through Ray's object store.

Each worker used to load the graph, split it and build the adjacency, the training CSR and the negative sampler
itself: identical copies, one per worker. At 1M users, 1M items and 50M events that is about 4 GB each (4.1 GB in
the object store), and two workers on one 24 GB node did not fit (Ray's memory monitor killed them at 10.2 GB per
worker). With more than one worker, one Ray task builds them (`build_shared_graph`) and returns them into the
object store; workers on a node map the same pages (numpy arrays come back from the object store zero-copy and
read-only), so a node holds one copy whatever its number of workers. A single worker builds them in its own
process: nothing to share.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from core.config import TrainConfig
from core.storage import Storage
from trainers.data import InterestGraph, Split, load_graph, split
from trainers.graph import build_norm_adjacency
from trainers.sampling import Csr, NegativeSampler, csr_from_pairs
from trainers.worker_inputs import WorkerInputs


def build_adjacency(graph: InterestGraph, users: np.ndarray, items: np.ndarray, weights: np.ndarray,
                    counts: np.ndarray | None, hp: TrainConfig) -> torch.Tensor:
    """The normalised adjacency over these user-item pairs (`counts`: their events by type) and every item's
    categories and brands; with train.relations by_event, each event type is a relation of its own."""
    by_event = hp.relations == "by_event" and counts is not None
    return build_norm_adjacency(
        graph.num_users, graph.num_items, graph.num_categories, graph.num_brands, users, items, weights,
        graph.ic_item, graph.ic_cat, graph.ib_item, graph.ib_brand, weighted=hp.weighted_edges,
        exponent=hp.degree_exponent, relations=counts if by_event else None,
        relation_weights=graph.relation_weights() if by_event else None,
    )


def train_csr_pairs(csr: Csr) -> tuple[np.ndarray, np.ndarray]:
    """Deduplicated (user, item) training pairs in CSR order."""
    users = np.repeat(np.arange(len(csr.indptr) - 1, dtype=np.int64), np.diff(csr.indptr))
    return users, np.asarray(csr.indices, dtype=np.int64)


@dataclass(frozen=True)
class SharedGraph:
    """The read-only part of a worker's set-up. The adjacency is kept as its CSR arrays: numpy travels through the
    object store zero-copy, a torch tensor would be copied into every worker."""

    graph: InterestGraph
    sp: Split
    adj_crow: np.ndarray  # int64 [num_nodes + 1]
    adj_col: np.ndarray  # int64 [nnz]
    adj_values: np.ndarray  # float32 [nnz]
    train_csr: Csr
    sampler: NegativeSampler
    pairs_user: np.ndarray  # every training pair in CSR order (a full training's; a rank takes every world-th)
    pairs_item: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.adj_crow) - 1

    def adjacency(self, device: torch.device) -> torch.Tensor:
        """The adjacency as a torch sparse CSR over these arrays (no copy on the CPU)."""
        with warnings.catch_warnings():
            # Arrays from the object store are read-only; nothing writes into the adjacency.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            parts = [torch.from_numpy(a) for a in (self.adj_crow, self.adj_col, self.adj_values)]
        n = self.num_nodes
        return torch.sparse_csr_tensor(*parts, size=(n, n), check_invariants=False).to(device)


def build_shared_graph(storage: Storage, hp: TrainConfig) -> SharedGraph:
    """Load the graph, split it and build what the workers read: the training adjacency, the training positives
    (CSR, for masking and negatives) and the training pairs."""
    graph = load_graph(storage, evidence=False, event_counts=hp.relations == "by_event")
    sp = split(graph, hp.holdout, hp.holdout_days)
    adj = build_adjacency(graph, sp.train_user, sp.train_item, sp.train_weight, sp.train_event_counts, hp)
    train_csr = csr_from_pairs(sp.train_user, sp.train_item, graph.num_users, graph.num_items)
    pairs_user, pairs_item = train_csr_pairs(train_csr)
    return SharedGraph(
        graph=graph, sp=sp, adj_crow=adj.crow_indices().numpy().astype(np.int64, copy=False),
        adj_col=adj.col_indices().numpy().astype(np.int64, copy=False), adj_values=adj.values().numpy(),
        train_csr=train_csr, sampler=NegativeSampler(train_csr.indptr, train_csr.indices, graph.num_items),
        pairs_user=pairs_user, pairs_item=pairs_item)


def with_shared_graph(inputs: WorkerInputs, workers: int, cpus: float) -> WorkerInputs:
    """`inputs` whose workers map one `SharedGraph` built by a Ray task (more than one worker), or `inputs` as
    they are (one worker builds its own). The task asks for one worker's CPUs, so it fits wherever a worker does;
    the reference lives as long as the caller holds the returned inputs (a replaced worker maps it again)."""
    if workers <= 1:
        return inputs
    import ray

    build = ray.remote(num_cpus=cpus)(build_shared_graph)
    return dataclasses.replace(inputs, shared=build.remote(inputs.storage, inputs.train))
