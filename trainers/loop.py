"""The per-worker training loop: BPR on this worker's shard of training pairs, each step over the batch's nodes.

Steps propagate only the batch (`trainers.minibatch`: one live layer over sampled neighbours, deeper layers from
embeddings refreshed a few times per pass over the training pairs); evaluation and the published vectors use the
full propagation.

`train_loop_per_worker(config)` is what Ray Train runs on each worker; `config["inputs"]` is a typed
`WorkerInputs`. The loop talks to its runtime only through a small `Session`, so tests drive it in-process
(`LocalSession`) before one real multi-worker run. Its body is four named steps: `set_up`, `train_epoch`,
`evaluate`, `save_state`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from core.config import TrainConfig
from trainers.data import InterestGraph, Split, evaluated_pairs
from trainers.graph import NodeOffsets, node_offsets
from trainers.losses import bpr_loss, l2_reg, softmax_loss
from trainers.metrics import recall_ndcg_at_k
from trainers.minibatch import (
    History,
    NeighbourRows,
    RowAdam,
    batch_output,
    compact,
    exchange_rows,
    refresh,
    share_rows,
)
from trainers.model import InterestGCN
from trainers.propagation import side_plan
from trainers.sampling import Csr, NegativeSampler, csr_from_pairs, with_replay
from trainers.shared_graph import build_adjacency, build_shared_graph
from trainers.spectral import GaussianRows, spectral_embeddings
from trainers.train_state import Checkpoint, TrainState, as_tensors
from trainers.worker_inputs import GrowFrom, WorkerInputs


class Session(Protocol):
    rank: int
    world: int
    local_world: int  # ranks on this node, this one included

    def report(self, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None: ...

    def restored_dir(self) -> str | None: ...

    def device(self) -> torch.device: ...


@dataclass
class LocalSession:
    """One in-process worker: what tests and the loop's unit checks use instead of Ray Train."""

    out_dir: str
    rank: int = 0
    world: int = 1
    local_world: int = 1
    reports: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: str | None = None
    restore_from: str | None = None

    def report(self, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None:
        self.reports.append(metrics)
        if checkpoint is not None:
            dest = os.path.join(self.out_dir, f"checkpoint_{len(self.reports):06d}")
            os.makedirs(dest)
            checkpoint.save(dest)
            self.last_checkpoint = dest

    def restored_dir(self) -> str | None:
        return self.restore_from

    def device(self) -> torch.device:
        return torch.device("cpu")


class RayTrainSession:
    """The loop's view of Ray Train: rank, device, reports with checkpoints, restore after a failure. Ranks share
    gradients through the process group Ray Train sets up (`minibatch.exchange_rows`), not through DDP: a step's
    gradient is a few rows of the table, and DDP would all-reduce all of it."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_world = ctx.get_local_world_size()
        self._restored: tempfile.TemporaryDirectory | None = None

    def report(self, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None:
        import ray.train

        if checkpoint is None:  # the other ranks: metrics only
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="ig-ckpt-") as tmp:  # Ray Train copies it into the run's storage
            checkpoint.save(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def restored_dir(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="ig-restore-")
        return checkpoint.to_directory(self._restored.name)

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()


def session_for(inputs: WorkerInputs, session: Session) -> Session:
    """The session a worker runs under: Ray Train's, wrapped by a test's fault injector when one is given."""
    return inputs.session_wrapper(session) if inputs.session_wrapper is not None else session


def _all_reduce(values: list[float], world: int, op: str = "sum") -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _rank_test_csr(sp: Split, hp: TrainConfig, num_users: int, num_items: int, rank: int, world: int) -> Csr:
    users, items = evaluated_pairs(sp, hp.eval_max_users, hp.seed)
    mine = users % world == rank
    return csr_from_pairs(users[mine], items[mine], num_users, num_items)


def item_degree_scale(offsets: NodeOffsets, items: np.ndarray, power: float) -> torch.Tensor | None:
    """Items' outputs times (degree / mean degree)^power over these pairs' items, every other node's 1; None when
    power is 0. GF-CF and the spectral filter score with D_I^1/2 on the item side: their best Gowalla figures need
    it. An item without pairs counts as degree 1, so it keeps a score."""
    if power == 0:
        return None
    deg = np.maximum(np.bincount(items, minlength=offsets.category - offsets.item).astype(np.float64), 1.0)
    scale = np.ones(offsets.num_nodes, np.float32)
    scale[offsets.item : offsets.category] = (deg / deg.mean()) ** power
    return torch.from_numpy(scale)


@dataclass
class Worker:
    """What one worker builds once (`set_up`) and every later step reads and advances."""

    inputs: WorkerInputs
    session: Session
    hp: TrainConfig
    device: torch.device
    graph: InterestGraph
    sp: Split
    offsets: NodeOffsets
    adj: torch.Tensor
    model: InterestGCN
    neighbours: NeighbourRows  # the adjacency's rows, sampled per step
    optimiser: RowAdam
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_csr: Csr
    test_csr: Csr
    sampler: NegativeSampler
    pairs_user: np.ndarray
    pairs_item: np.ndarray
    steps: int  # optimiser steps per epoch, the same on every rank
    passes: float  # passes over this rank's pairs that an epoch's steps make (a warm start, a refit: several)
    started: float  # wall clock at which training began (earlier when resumed: seconds count on)
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    parent_metrics: dict[str, float] | None = None
    total_steps: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # where this worker's time went (update timings)
    frozen: torch.Tensor | None = None  # rows of the embedding table a warm start must not move (bool per node)
    stored: History | None = None  # propagated stored embeddings: a step's deeper layers and negatives' scores
    stored_fresh: bool = False  # `stored` propagates the table as it is now (no step since): no refresh needed

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world(self) -> int:
        return self.session.world


@dataclass
class EpochResult:
    loss: float | None  # mean over steps and ranks; None: no step (a re-filter that publishes the filter alone)
    steps: int
    stop: bool  # the deadline or max_steps was reached, or the epoch had no steps: this epoch is the last


def set_up(inputs: WorkerInputs, session: Session) -> Worker:
    """Load the graph, split it, build the adjacency and the model (from a warm start, the spectral start or a
    restored checkpoint), and pick this rank's training pairs."""
    hp = inputs.train
    torch.set_num_threads(inputs.threads)
    torch.manual_seed(hp.seed)
    mark = time.time()
    shared = _resolve(inputs.shared) if inputs.shared is not None else build_shared_graph(inputs.storage, hp)
    graph, sp = shared.graph, shared.sp
    offsets = node_offsets(graph.num_users, graph.num_items, graph.num_categories, graph.num_brands)
    device = session.device()
    adj = shared.adjacency(device)
    # Filled by exactly one of the branches below.
    model = InterestGCN(offsets.num_nodes, hp.embedding_dim, hp.num_layers, initialise=False)
    model.set_output_scale(item_degree_scale(offsets, sp.train_item, hp.item_degree_power))
    model.set_plan(side_plan(adj, offsets.item, offsets.category))
    if inputs.warm is not None:
        init = _resolve(inputs.warm.init_state)
        if isinstance(init, GrowFrom):
            _grow_parent(model, init, inputs.storage, graph, sp)
        else:
            model.load_state_dict(as_tensors(init, writable=False))  # copied in
    elif hp.init == "spectral":
        with torch.no_grad():
            _spectral_start(adj, offsets, hp, session, device, model.embedding.weight.detach())
    else:
        model.reset_parameters()
    _KEPT.table = _KEPT.table_cycle = None  # not taken (no parent grown on this disk): done with all the same
    model.to(device)
    optimiser = _optimiser(model, hp.lr)
    # Per-epoch decay: a high starting rate gets the spectral start moving fast, a falling one stops it overfitting.
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=hp.lr_decay)
    train_csr = shared.train_csr
    if inputs.warm is not None and inputs.warm.pair_index is not None:
        pairs_user, pairs_item = update_pairs(sp, inputs.warm.pair_index)
    else:
        pairs_user, pairs_item = shared.pairs_user, shared.pairs_item
    if inputs.warm is not None:
        steps, passes = inputs.warm.steps, inputs.warm.passes
    else:
        steps, passes = steps_per_pass(len(pairs_user), session.world, hp.batch_size), 1.0
    worker = Worker(
        inputs=inputs, session=session, hp=hp, device=device, graph=graph, sp=sp, offsets=offsets, adj=adj,
        model=model, neighbours=NeighbourRows(adj, hp.fanout), optimiser=optimiser, scheduler=scheduler,
        train_csr=train_csr,
        test_csr=_rank_test_csr(sp, hp, graph.num_users, graph.num_items, session.rank, session.world),
        sampler=shared.sampler,
        pairs_user=pairs_user, pairs_item=pairs_item, steps=steps, passes=passes, started=time.time())
    if inputs.warm is not None and inputs.warm.trainable is not None:
        worker.frozen = torch.from_numpy(~np.asarray(_resolve(inputs.warm.trainable), dtype=bool)).to(device)
    worker.phases["setup"] = round(time.time() - mark, 3)
    restored = session.restored_dir()
    if restored is not None:
        state = TrainState.load(restored)
        model.load_state_dict(state.model)
        optimiser.load_state_dict(state.optimiser)
        scheduler.load_state_dict(state.scheduler)
        worker.start_epoch, worker.history = state.epoch + 1, state.history
        worker.started = time.time() - state.seconds
        worker.parent_metrics, worker.total_steps = state.parent_metrics, state.steps
    elif inputs.warm is not None:
        if inputs.warm.eval_parent:
            # The starting point scored on the same holdout: what a warm start must not fall below. Its propagation
            # is the first refresh's, unless the filter replaces the table next.
            mark = time.time()
            final = None
            if not inputs.warm.refilter:
                worker.stored, worker.stored_fresh = refresh(model, adj), True
                final = worker.stored.final
            worker.parent_metrics, _ = evaluate(worker, final)
            worker.phases["eval_parent"] = round(time.time() - mark, 3)
        if inputs.warm.refilter:
            mark = time.time()
            with torch.no_grad():
                _spectral_start(adj, offsets, hp, session, device, model.embedding.weight.detach())
            worker.phases["refilter"] = round(time.time() - mark, 3)
    return worker


def _grow_parent(model: InterestGCN, parent: GrowFrom, storage: Any, graph: InterestGraph, sp: Split) -> None:
    """The parent's table grown to this run's graph straight into the model's: from the table this resident worker
    kept at the end of the cycle that produced the parent, where it did (`GrowFrom.kept`), else mapped from its
    file."""
    from registry.reader import load_model
    from trainers.warm_start import extend_embeddings

    kept, cycle = _KEPT.table, _KEPT.table_cycle
    _KEPT.table = _KEPT.table_cycle = None  # taken: this cycle's table replaces it whichever way it grows
    if kept is not None and parent.kept is not None and parent.kept == cycle \
            and kept.shape == (sum(parent.counts.values()), model.embedding_dim) \
            and list(model.state_dict()) == ["embedding.weight"]:
        extend_embeddings(kept.numpy(), parent.counts, graph, sp.train_user, sp.train_item,
                          out=model.embedding.weight.detach().numpy())
        return
    state = load_model(storage, parent.folder, parent.sha, parent.label, mapped=True, verify=False)["state_dict"]
    old = state.pop("embedding.weight").numpy()
    extend_embeddings(old, parent.counts, graph, sp.train_user, sp.train_item,
                      out=model.embedding.weight.detach().numpy())
    if state:  # parameters beside the table (none today) load as they are
        model.load_state_dict(state, strict=False)


def _spectral_start(adj: torch.Tensor, offsets: NodeOffsets, hp: TrainConfig, session: Session,
                    device: torch.device, table: torch.Tensor) -> None:
    """Fill `table` (the model's embedding table) with the filter start, computed once: rank 0 runs the randomized
    SVD and broadcasts the result. Every rank would compute the same start (same graph, same seed), each spending
    its own core and its own SVD working memory on it. The other ranks wait in the broadcast, so the SVD must end
    within the process group's timeout; those on rank 0's node wait without using their cores (gloo blocks), so rank
    0 takes their threads for the SVD (1,024 pairs of Gowalla: 27.5 s on one thread, 15.1 s on two).

    On the CPU the start is computed into the table and broadcast into the other ranks' tables: a separate start
    and its copy were two fresh table-sized blocks a rank (see `spectral_embeddings`). A table elsewhere than
    `device` (the model before it moves to a GPU) gets the start through one on the device, which NCCL needs."""
    direct = table.device == device
    target = table if direct else torch.empty(table.shape, device=device)
    if session.world == 1 or session.rank == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(threads * session.local_world)
        try:
            kwargs = {"seed": hp.seed, "filter_beta": hp.spectral_filter, "num_layers": hp.num_layers,
                      "draws": _KEPT.draws}
            if target.device.type == "cpu":
                spectral_embeddings(adj, offsets, hp.embedding_dim, out=target, **kwargs)
            else:
                target.copy_(spectral_embeddings(adj, offsets, hp.embedding_dim, **kwargs))
        finally:
            torch.set_num_threads(threads)
    if session.world > 1:
        dist.broadcast(target, src=0)
    if not direct:
        table.copy_(target)


@dataclass
class _Kept:
    draws: GaussianRows | None = None  # the SVD's test matrix (rank 0's, which computes the filter start)
    table: torch.Tensor | None = None  # the last cycle's final embedding table (`keep_table`)
    table_cycle: int | None = None  # the resident cycle it ended


# A final table larger than this is not kept (the next cycle maps the file): at a million nodes and 1,024 dimensions
# it is 4 GB, held beside the next cycle's own table while it grows.
KEEP_TABLE_MAX_BYTES = 2 << 30


def keep_table(table: torch.Tensor, cycle: int) -> None:
    """Keep a resident cycle's final embedding table (CPU, within KEEP_TABLE_MAX_BYTES) until the next cycle's
    set-up: where the driver published it as it was, the next cycle's parent is this table to the bit
    (`GrowFrom.kept`), and growing it from memory spares each worker reading model.pt from the disk (0.2-0.4 s of
    a Taobao cycle's set-up)."""
    if _KEPT.draws is None:  # not a resident worker (`warm_up`)
        return
    fits = table.device.type == "cpu" and table.numel() * table.element_size() <= KEEP_TABLE_MAX_BYTES
    _KEPT.table, _KEPT.table_cycle = (table.detach(), cycle) if fits else (None, None)


# What a resident worker keeps between its cycles (`warm_up`); a one-shot training keeps nothing.
_KEPT = _Kept()


def warm_up(predraw: tuple[int, int, int] | None = None) -> None:
    """Make this process a resident worker (`trainers.resident`), before its first cycle: pay there what that
    cycle paid (torch's first optimiser imports its compiler stack: about 800 modules, 0.9 s of the set-up), and
    keep the randomized SVD's Gaussian draw from one re-filter to the next (`GaussianRows`).

    `predraw` (rank 0: rows, width, seed): the draw the first re-filter is expected to make, drawn now where it
    would be kept, so that re-filter draws only the rows of items new since (a whole draw, 0.35-0.45 s of a Taobao
    re-filter). A wrong guess costs only the time taken here: a draw of another width or seed starts again."""
    RowAdam([torch.nn.Parameter(torch.zeros(1, 1))], lr=1.0)
    _KEPT.draws = _KEPT.draws or GaussianRows()
    if predraw is not None and _KEPT.draws.keeps(predraw[0], predraw[1]):
        _KEPT.draws.draw(*predraw)


def _optimiser(model: InterestGCN, lr: float) -> RowAdam:
    """A lazy Adam: a step's gradient is a few rows of the table, and only those rows (and their moments) move."""
    return RowAdam([model.embedding.weight], lr=lr)


# Floats of candidates' rows a CPU chunk of `_hard_negatives` gathers: 2 MB, a core's L2 here.
HARD_NEGATIVE_CHUNK_FLOATS = 1 << 19


def _hard_negatives(sampler: NegativeSampler, users: np.ndarray, rng: np.random.Generator, candidates: int,
                    emb: torch.Tensor, item_base: int, device: torch.device) -> np.ndarray:
    """One negative per user (node ids): the best-scoring of `candidates` uniform non-positives by `emb` (dynamic
    negative sampling). Uniform negatives are soon too easy for BPR to learn from; the hardest of a few keeps the
    gradient useful."""
    neg = sampler.sample(np.repeat(users, candidates), rng).reshape(len(users), candidates) + item_base
    if candidates == 1:
        return neg[:, 0]
    n_t, u_t = torch.from_numpy(neg).to(device), torch.from_numpy(users).to(device)
    best = torch.empty(len(users), dtype=torch.int64, device=device)
    # In chunks: all candidates' vectors at once would be batch x candidates x dim floats (2 GB at 1,024 dims). On
    # the CPU a chunk's gathered rows fit in a core's L2 (2 MB), where the product reads them back: 16 MB chunks
    # made each step's scoring twice as slow, the rows going out to memory and back in between.
    budget = HARD_NEGATIVE_CHUNK_FLOATS if emb.device.type == "cpu" else 1 << 22
    chunk = max(1, budget // (candidates * emb.shape[1]))
    width = emb.shape[1]
    with torch.no_grad():
        for s in range(0, len(users), chunk):
            rows = emb.index_select(0, n_t[s : s + chunk].reshape(-1)).view(-1, candidates, width)
            scores = torch.bmm(rows, emb.index_select(0, u_t[s : s + chunk]).unsqueeze(2)).squeeze(2)
            best[s : s + chunk] = scores.argmax(dim=1)
    return neg[np.arange(len(users)), best.cpu().numpy()]


def train_step(w: Worker, users: np.ndarray, pos: np.ndarray, rng: np.random.Generator) -> float:
    """One optimiser step on (user, positive item) node ids: a hard negative each, the final embeddings of the
    batch's nodes only, BPR (or softmax) plus L2 on their ego rows, the rows' gradient shared between ranks."""
    hp = w.hp
    assert w.stored is not None
    neg = _hard_negatives(w.sampler, users, rng, hp.negatives, w.stored.final, w.offsets.item, w.device)
    nodes, inverse = compact(np.concatenate([users, pos, neg]), w.offsets.num_nodes)
    batch = batch_output(w.model, w.stored, w.neighbours, nodes, rng, w.device)
    out, ego, b = batch.out, batch.ego, len(users)
    at = torch.from_numpy(inverse.reshape(-1)).to(w.device)
    u_i, p_i, n_i = at[:b], at[b : 2 * b], at[2 * b :]
    if hp.loss == "softmax":
        rank_loss = softmax_loss(out[u_i], out[p_i], out[n_i], hp.temperature)
    else:
        rank_loss = bpr_loss(out[u_i], out[p_i], out[n_i])
    loss = rank_loss + hp.l2 * l2_reg(ego[u_i], ego[p_i], ego[n_i], b)
    loss.backward()
    # Rows a warm start must not move get no gradient, and a lazy Adam leaves a row without one where it is.
    rows = exchange_rows(batch.index, batch.leaf.grad, w.frozen, w.world)
    w.optimiser.step(rows=rows)  # this rank's own rows; the others' new values come from their ranks
    share_rows(w.model.embedding.weight, rows[0], w.world)
    return float(loss.detach())


def train_epoch(w: Worker, epoch: int) -> EpochResult:
    """`w.passes` passes over this rank's pairs in `w.steps` steps (wrapping round between passes)."""
    hp, inputs = w.hp, w.inputs
    rng = np.random.default_rng(hp.seed * 1_000_003 + epoch * 1_009 + w.rank)
    order = rng.permutation(np.arange(w.rank, len(w.pairs_user), w.world))
    batch = step_batch(len(order), w.steps, w.passes, hp.batch_size)
    if len(order) < w.steps * batch:  # wrap around so several passes, and short shards, fill every step
        order = np.resize(order, w.steps * batch)
    # From numbers every rank shares (a rank's pairs differ by one), so every rank refreshes at the same steps.
    shared_batch = step_batch(math.ceil(len(w.pairs_user) / w.world), w.steps, w.passes, hp.batch_size)
    refresh_every = math.ceil(w.steps / refreshes(w.steps * shared_batch * w.world, len(w.train_csr.indices),
                                                  hp.refreshes_per_epoch, w.steps))
    loss_sum, step, stop = 0.0, 0, False
    for step in range(w.steps):
        if step % refresh_every == 0 and not w.stored_fresh:
            mark = time.time()
            w.stored = None  # the old copy's memory is free before the new one is computed, not after
            w.stored = refresh(w.model, w.adj)
            w.phases["refresh"] = round(w.phases.get("refresh", 0.0) + time.time() - mark, 3)
        w.stored_fresh = False  # this step moves the table
        idx = order[step * batch : (step + 1) * batch]
        loss_sum += train_step(w, w.pairs_user[idx], w.pairs_item[idx] + w.offsets.item, rng)
        w.total_steps += 1
        out_of_time = inputs.deadline is not None and time.time() >= inputs.deadline
        out_of_steps = inputs.max_steps is not None and w.total_steps >= inputs.max_steps
        stop = out_of_time or out_of_steps
        if w.world > 1:  # every rank stops at the same step, or the gradient exchange would wait for one that stopped
            stop = _all_reduce([float(stop)], w.world, "max")[0] > 0
        if stop:
            break
    w.scheduler.step()
    loss_mean = _all_reduce([loss_sum / (step + 1)], w.world)[0] / w.world
    return EpochResult(loss=loss_mean, steps=step + 1, stop=stop)


def refreshes(triples: int, train_pairs: int, per_pass: int, steps: int) -> int:
    """Full propagations an epoch of `steps` steps over `triples` makes: `per_pass` for every pass over the
    `train_pairs` (a full epoch: `per_pass`), at least one and at most one a step. The refreshes follow what the
    steps move: a cycle over a thousand new pairs of a 40,000-pair graph moves a few rows by a few steps, and
    propagating the whole table before each of its steps was most of its time (bench.warm_start)."""
    # Rounded, not ceiled: a full epoch's steps round its pairs up to whole batches, which is not a fifth refresh.
    return max(1, min(steps, round(per_pass * triples / max(train_pairs, 1))))


def embeddings(w: Worker, final: torch.Tensor | None = None) -> torch.Tensor:
    """The propagated embeddings of every node (`final`: already propagated, by a refresh of the same table). A
    model trained on cosine scores is exported with unit vectors, so that a plain dot product ranks as it did."""
    w.model.eval()
    with torch.no_grad():
        emb = w.model(w.adj) if final is None else final
        if w.hp.loss == "softmax":
            emb = torch.nn.functional.normalize(emb, dim=-1)
    w.model.train()
    return emb


def evaluate(w: Worker, final: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """Recall/NDCG@K over this rank's test users, summed across ranks; also the final embeddings of every node
    (`final`: the table's propagation, when a refresh has it)."""
    graph, k = w.graph, w.hp.k
    emb = embeddings(w, final)
    users, items = emb[: graph.num_users], emb[graph.num_users : graph.num_users + graph.num_items]
    k_eff = min(k, graph.num_items)
    # Scores come back to the CPU, where the masks and test sets live (a no-op without a GPU).
    local = recall_ndcg_at_k(lambda b: (users[b.to(users.device)] @ items.T).cpu(), w.train_csr, w.test_csr, k_eff,
                             w.hp.eval_batch_users)
    n = local["users"]
    r_sum, n_sum, count = _all_reduce([local[f"recall@{k_eff}"] * n, local[f"ndcg@{k_eff}"] * n, n], w.world)
    metrics = {f"recall@{k}": r_sum / max(count, 1), f"ndcg@{k}": n_sum / max(count, 1), "eval_users": int(count)}
    return metrics, emb


def refit(w: Worker, epoch: int) -> tuple[dict[str, Any], torch.Tensor]:
    """After the last evaluation: learn the held-out pairs as well, so the published vectors have seen every
    ingested pair (train.refit). One more "epoch" over the held-out pairs plus replayed training pairs, sized and
    stepped like a warm-start update (a fresh Adam, no decay, the time budget already spent on training does not
    cut it short), over the adjacency and positives of the whole graph; the final embeddings propagate over it too.
    Returns what was done, and the embeddings to publish."""
    r, g, held = w.inputs.refit, w.graph, w.sp.test_mask
    mark = time.time()
    users, items = g.ui_user.astype(np.int64), g.ui_item.astype(np.int64)
    w.adj = build_adjacency(g, users, items, g.ui_weight, g.ui_event_counts, w.hp).to(w.device)
    w.model.set_output_scale(item_degree_scale(w.offsets, items, w.hp.item_degree_power))
    w.model.set_plan(side_plan(w.adj, w.offsets.item, w.offsets.category))
    w.train_csr = csr_from_pairs(users, items, g.num_users, g.num_items)
    w.sampler = NegativeSampler(w.train_csr.indptr, w.train_csr.indices, g.num_items)
    new = np.flatnonzero(held)
    pick = with_replay(new, np.flatnonzero(~held), r.replay_ratio, np.random.default_rng(w.hp.seed * 7_919 + epoch))
    w.pairs_user, w.pairs_item = users[pick], items[pick]
    w.steps = passes_to_steps(len(pick), w.world, w.hp.batch_size, r.epochs, r.max_steps)
    w.passes = r.epochs
    w.neighbours = NeighbourRows(w.adj, w.hp.fanout)
    w.stored_fresh = False  # a new adjacency: what was propagated over the old one is stale
    w.optimiser = _optimiser(w.model, r.lr)
    w.scheduler = torch.optim.lr_scheduler.ExponentialLR(w.optimiser, gamma=1.0)
    w.inputs = dataclasses.replace(w.inputs, deadline=None, max_steps=None)
    result = train_epoch(w, epoch)
    seconds = round(time.time() - mark, 3)
    w.phases["refit"] = seconds
    done = {"held_out_pairs": int(len(new)), "replayed_pairs": int(len(pick) - len(new)), "steps": result.steps,
            "loss": result.loss, "seconds": seconds}
    return done, embeddings(w)


def _refits(w: Worker) -> bool:
    """The driver asks for a refit (full trainings only); the split decides: nothing held out of the graph, or an
    official test file (the benchmark's), is never trained on."""
    return w.inputs.refit is not None and w.sp.mode != "official" and bool(w.sp.test_mask.any())


def save_state(w: Worker, entry: dict[str, Any], final: bool, emb: torch.Tensor | None) -> None:
    """Report the epoch to the session; rank 0 attaches the training state (and, when final, the embeddings)."""
    if not final:  # a run resumes from this one: its moments, of which each rank holds the rows it owns
        w.optimiser.gather_moments(w.world)
    checkpoint = None
    if w.rank == 0:
        optimiser = w.optimiser.state_dict()
        if final:  # nothing resumes after the last report, and the moments are twice the table
            optimiser = {"state": {}, "param_groups": optimiser["param_groups"]}
        state = TrainState(
            model=w.model.state_dict(), optimiser=optimiser, scheduler=w.scheduler.state_dict(),
            epoch=entry["epoch"], history=w.history, seconds=time.time() - w.started,
            hparams={"num_nodes": w.offsets.num_nodes, "embedding_dim": w.hp.embedding_dim,
                     "num_layers": w.hp.num_layers},
            split={"mode": w.sp.mode, "train_pairs": int(len(w.pairs_user)),
                   "test_pairs": int(len(w.sp.test_user))},
            steps=w.total_steps, parent_metrics=w.parent_metrics, phases=w.phases,
        )
        blocks = None
        if final and emb is not None:
            e = emb.detach().cpu().numpy().astype(np.float32, copy=False)
            o = w.offsets
            blocks = {"users": e[: o.item], "items": e[o.item : o.category], "categories": e[o.category : o.brand],
                      "brands": e[o.brand : o.num_nodes]}
        checkpoint = Checkpoint(state, blocks)
    w.session.report({**entry, "final": final}, checkpoint)


def run_worker(inputs: WorkerInputs, session: Session) -> torch.Tensor:
    """Train, evaluate and checkpoint through `session`; the last report carries the final embeddings. Returns the
    final embedding table (the model's parameters)."""
    w = set_up(inputs, session)
    hp = w.hp
    for epoch in range(w.start_epoch, hp.epochs):
        mark = time.time()
        result = train_epoch(w, epoch) if w.steps else EpochResult(loss=None, steps=0, stop=True)
        w.phases["train"] = round(w.phases.get("train", 0.0) + time.time() - mark, 3)
        final = result.stop or epoch == hp.epochs - 1
        entry: dict[str, Any] = {"epoch": epoch, "seconds": round(time.time() - w.started, 3), "loss": result.loss,
                                 "steps": result.steps}
        emb = None
        if final or (epoch + 1) % hp.eval_every == 0:
            mark = time.time()
            metrics, emb = evaluate(w)
            w.phases["eval"] = round(w.phases.get("eval", 0.0) + time.time() - mark, 3)
            entry.update(metrics)
            if final and _refits(w):
                entry["refit"], emb = refit(w, epoch + 1)
        w.history.append(entry)
        if w.rank == 0:  # progress per epoch; Ray forwards a worker's stdout to the driver's console
            name = f"recall@{hp.k}"
            quality = f", {name} {entry[name]:.4f}" if name in entry else ""
            loss = "no steps" if result.loss is None else f"loss {result.loss:.4f}"
            print(f"epoch {epoch + 1}/{hp.epochs}: {loss}{quality}, {entry['seconds']:.0f} s",
                  flush=True)
            if "refit" in entry:
                r = entry["refit"]
                print(f"refit on the {r['held_out_pairs']} held-out pairs (+{r['replayed_pairs']} replayed): "
                      f"{r['steps']} steps, {r['seconds']:.0f} s", flush=True)
        save_state(w, entry, final, emb)
        if final:
            break
    return w.model.embedding.weight.detach()


def steps_per_pass(pairs: int, world: int, batch: int) -> int:
    """Steps for one pass over `pairs` split across `world` ranks. Every rank takes the same number, or the
    gradient exchange would wait for a rank that stopped."""
    return max(1, math.ceil(math.ceil(pairs / world) / batch))


def step_batch(pairs: int, steps: int, passes: float, batch: int) -> int:
    """Triples per step on a rank: `passes` over its `pairs` in `steps` steps, at most `batch`. A cycle's thousand
    pairs are not padded to full batches (4 steps of 16,384 were 64 passes where 4 were asked: slower, and overfit)."""
    return max(1, min(batch, math.ceil(pairs * passes / max(steps, 1))))


def passes_to_steps(pairs: int, world: int, batch: int, passes: float, max_steps: int) -> int:
    """Steps of `passes` passes over `pairs` (a warm start, a refit), at most `max_steps`: the work follows the
    pairs, and a small set is not passed over dozens of times."""
    return max(1, min(max_steps, math.ceil(passes * steps_per_pass(pairs, world, batch))))


def _resolve(value: Any) -> Any:
    """Large inputs travel through Ray's object store as references."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def update_pairs(sp: Split, pair_index: Any) -> tuple[np.ndarray, np.ndarray]:
    """A warm start's training pairs, chosen by the driver (indices into the split's training pairs)."""
    idx = np.asarray(_resolve(pair_index), dtype=np.int64)
    return sp.train_user[idx].astype(np.int64), sp.train_item[idx].astype(np.int64)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    inputs: WorkerInputs = config["inputs"]
    run_worker(inputs, session_for(inputs, RayTrainSession()))
