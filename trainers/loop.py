"""The per-worker training loop: full-graph LightGCN propagation, BPR on this worker's shard of training pairs.

`train_loop_per_worker(config)` is what Ray Train runs on each worker. The loop itself talks to its runtime only
through a small `Session`, so tests can drive it in-process (`LocalSession`) before one real multi-worker run.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from datasets.storage import Storage
from trainers.data import InterestGraph, Split, load_graph, split
from trainers.graph import build_norm_adjacency, node_offsets
from trainers.losses import bpr_loss, l2_reg, softmax_loss
from trainers.metrics import recall_ndcg_at_k
from trainers.model import InterestGCN
from trainers.sampling import Csr, NegativeSampler, csr_from_pairs
from trainers.spectral import spectral_embeddings

STATE_FILE = "state.pt"
EMBEDDINGS_FILE = "embeddings.npz"


class Session(Protocol):
    rank: int
    world: int

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...

    def restored_dir(self) -> str | None: ...

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def device(self) -> torch.device: ...


@dataclass
class LocalSession:
    """One in-process worker: what tests and the loop's unit checks use instead of Ray Train."""

    out_dir: str
    rank: int = 0
    world: int = 1
    reports: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: str | None = None
    restore_from: str | None = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            import shutil

            dest = os.path.join(self.out_dir, f"checkpoint_{len(self.reports):06d}")
            shutil.copytree(checkpoint_dir, dest)
            self.last_checkpoint = dest

    def restored_dir(self) -> str | None:
        return self.restore_from

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def device(self) -> torch.device:
        return torch.device("cpu")


class RayTrainSession:
    """The loop's view of Ray Train: rank, DDP wrapping, reports with checkpoints, restore after a failure."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self._restored: tempfile.TemporaryDirectory | None = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def restored_dir(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="ig-restore-")
        return checkpoint.to_directory(self._restored.name)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()


def _all_reduce(values: list[float], world: int, op: str = "sum") -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _rank_test_csr(sp: Split, num_users: int, num_items: int, rank: int, world: int) -> Csr:
    mine = sp.test_user % world == rank
    return csr_from_pairs(sp.test_user[mine], sp.test_item[mine], num_users, num_items)


def build_adjacency(graph: InterestGraph, sp: Split) -> torch.Tensor:
    return build_norm_adjacency(
        graph.num_users, graph.num_items, graph.num_categories, graph.num_brands,
        sp.train_user, sp.train_item, sp.train_weight,
        graph.ic_item, graph.ic_cat, graph.ib_item, graph.ib_brand,
    )


def evaluate(model: InterestGCN, adj: torch.Tensor, graph: InterestGraph, train_csr: Csr, test_csr: Csr, k: int,
             batch_users: int, world: int, normalise: bool = False) -> tuple[dict[str, float], torch.Tensor]:
    """Recall/NDCG@K over this rank's test users, summed across ranks; also the final embeddings.

    A model trained on cosine scores is exported with unit vectors, so that a plain dot product ranks as it did.
    """
    model.eval()
    with torch.no_grad():
        emb = model(adj)
        if normalise:
            emb = torch.nn.functional.normalize(emb, dim=-1)
    model.train()
    users, items = emb[: graph.num_users], emb[graph.num_users : graph.num_users + graph.num_items]
    k_eff = min(k, graph.num_items)
    # Scores come back to the CPU, where the masks and test sets live (a no-op without a GPU).
    local = recall_ndcg_at_k(lambda b: (users[b.to(users.device)] @ items.T).cpu(), train_csr, test_csr, k_eff,
                             batch_users)
    n = local["users"]
    r_sum, n_sum, count = _all_reduce([local[f"recall@{k_eff}"] * n, local[f"ndcg@{k_eff}"] * n, n], world)
    metrics = {f"recall@{k}": r_sum / max(count, 1), f"ndcg@{k}": n_sum / max(count, 1), "eval_users": int(count)}
    return metrics, emb


def _hard_negatives(sampler: NegativeSampler, users: np.ndarray, rng: np.random.Generator, candidates: int,
                    emb: torch.Tensor, u_t: torch.Tensor, item_base: int, device: torch.device) -> torch.Tensor:
    """One negative per user: the best-scoring of `candidates` uniform non-positives (dynamic negative sampling).

    Uniform negatives are soon too easy for BPR to learn from; the hardest of a few keeps the gradient useful.
    """
    neg = sampler.sample(np.repeat(users, candidates), rng).reshape(len(users), candidates) + item_base
    n_t = torch.from_numpy(neg).to(device)
    if candidates > 1:
        with torch.no_grad():
            scores = (emb[n_t] * emb[u_t].unsqueeze(1)).sum(-1)
            n_t = n_t.gather(1, scores.argmax(dim=1, keepdim=True))
    return n_t[:, 0]


def _maybe_fail(config: dict, rank: int, epoch: int) -> None:
    """Test hook: a real process death (or, with "raise", an exception) at a chosen rank and epoch, once per
    marker file; `fault` is one such dict or a list of them, taken in order."""
    faults = config.get("fault") or []
    for fault in [faults] if isinstance(faults, dict) else faults:
        marker = Path(fault["marker"])
        if fault["rank"] != rank or fault["epoch"] != epoch or marker.exists():
            continue
        marker.write_text(f"rank {rank} failed at epoch {epoch}\n")
        if fault.get("raise"):
            raise RuntimeError(f"injected fault at rank {rank}, epoch {epoch}")
        os._exit(1)


def run_worker(config: dict, session: Session) -> None:
    """Train, evaluate and checkpoint through `session`; the last report carries the final embeddings."""
    hp = config["hparams"]
    torch.set_num_threads(int(config.get("threads", 1)))
    torch.manual_seed(hp["seed"])
    rank, world = session.rank, session.world
    phases: dict[str, float] = {}  # where this worker's time went, for the update summary's timings
    mark = time.time()
    storage = Storage(config["root"], config.get("endpoint"), config.get("region"))
    graph = load_graph(storage)
    sp = split(graph, hp["holdout"], hp["holdout_days"])
    offsets = node_offsets(graph.num_users, graph.num_items, graph.num_categories, graph.num_brands)
    device = session.device()
    adj = build_adjacency(graph, sp).to(device)
    model = InterestGCN(offsets.num_nodes, hp["embedding_dim"], hp["num_layers"])
    init_state = config.get("init_state")
    if init_state is not None:
        model.load_state_dict(_resolve(init_state))
    elif hp["init"] == "spectral":
        with torch.no_grad():
            model.embedding.weight.copy_(spectral_embeddings(
                graph.num_users, graph.num_items, sp.train_user, sp.train_item, graph.ic_item, graph.ic_cat,
                graph.ib_item, graph.ib_brand, offsets, hp["embedding_dim"], seed=hp["seed"]))
    model.to(device)
    phases["setup"] = round(time.time() - mark, 3)
    optimiser = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    # Per-epoch decay: a high starting rate gets the spectral start moving fast, a falling one stops it overfitting.
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=hp["lr_decay"])
    start_epoch, history, spent_before = 0, [], 0.0
    restored = session.restored_dir()
    if restored is not None:
        state = torch.load(os.path.join(restored, STATE_FILE), map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, spent_before = state["epoch"] + 1, state["history"], state["seconds"]
    wrapped = session.wrap(model)

    train_csr = csr_from_pairs(sp.train_user, sp.train_item, graph.num_users, graph.num_items)
    sampler = NegativeSampler(train_csr.indptr, train_csr.indices, graph.num_items)
    test_csr = _rank_test_csr(sp, graph.num_users, graph.num_items, rank, world)
    pairs_user, pairs_item = update_pairs(sp, config) if "pair_index" in config else train_csr_pairs(train_csr)
    mine = np.arange(rank, len(pairs_user), world)
    batch = hp["batch_size"]
    steps = steps_per_pass(len(pairs_user), world, batch)
    if config.get("steps_per_epoch"):
        # A warm start is one "epoch" of the driver's step count (wrapping over its pairs): one checkpoint, no decay.
        steps = int(config["steps_per_epoch"])
    item_base = offsets.item
    deadline = config.get("deadline")
    started = time.time() - spent_before
    max_steps = config.get("max_steps")
    total_steps = 0
    stop = False
    parent_metrics = None
    if config.get("eval_parent") and restored is None:
        # The starting point scored on the same holdout: what a warm start must not fall below.
        mark = time.time()
        parent_metrics, _ = evaluate(model, adj, graph, train_csr, test_csr, hp["k"], hp["eval_batch_users"], world,
                                     normalise=hp["loss"] == "softmax")
        phases["eval_parent"] = round(time.time() - mark, 3)
    elif restored is not None:
        parent_metrics = state.get("parent_metrics")
    for epoch in range(start_epoch, hp["epochs"]):
        _maybe_fail(config, rank, epoch)
        rng = np.random.default_rng(hp["seed"] * 1_000_003 + epoch * 1_009 + rank)
        order = rng.permutation(mine)
        if len(order) < steps * batch:  # wrap around so short shards still fill every step
            order = np.resize(order, steps * batch)
        loss_sum = 0.0
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            users = pairs_user[idx]
            pos = pairs_item[idx]
            u_t = torch.from_numpy(users).to(device)
            p_t = torch.from_numpy(pos + item_base).to(device)
            emb = wrapped(adj)
            n_t = _hard_negatives(sampler, users, rng, hp["negatives"], emb, u_t, item_base, device)
            ego = model.ego
            if hp["loss"] == "softmax":
                rank_loss = softmax_loss(emb[u_t], emb[p_t], emb[n_t], hp["temperature"])
            else:
                rank_loss = bpr_loss(emb[u_t], emb[p_t], emb[n_t])
            loss = rank_loss + hp["l2"] * l2_reg(ego[u_t], ego[p_t], ego[n_t], len(idx))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            loss_sum += float(loss.detach())
            total_steps += 1
            out_of_time = deadline is not None and time.time() >= deadline
            out_of_steps = max_steps is not None and total_steps >= max_steps
            if world > 1:
                out_of_time = _all_reduce([float(out_of_time or out_of_steps)], world, "max")[0] > 0
            if out_of_time or out_of_steps:
                stop = True
                break
        scheduler.step()
        final = stop or epoch == hp["epochs"] - 1
        loss_mean = _all_reduce([loss_sum / max(step + 1, 1)], world)[0] / world
        entry: dict[str, Any] = {"epoch": epoch, "seconds": round(time.time() - started, 3), "loss": loss_mean,
                                 "steps": step + 1}
        if final or (epoch + 1) % hp["eval_every"] == 0:
            mark = time.time()
            metrics, emb = evaluate(model, adj, graph, train_csr, test_csr, hp["k"], hp["eval_batch_users"], world,
                                    normalise=hp["loss"] == "softmax")
            phases["eval"] = phases.get("eval", 0.0) + round(time.time() - mark, 3)
            entry.update(metrics)
        history.append(entry)
        if rank == 0:  # progress per epoch; Ray forwards a worker's stdout to the driver's console
            name = f"recall@{hp['k']}"
            quality = f", {name} {entry[name]:.4f}" if name in entry else ""
            print(f"epoch {epoch + 1}/{hp['epochs']}: loss {loss_mean:.4f}{quality}, {entry['seconds']:.0f} s",
                  flush=True)
        with tempfile.TemporaryDirectory(prefix="ig-ckpt-") as tmp:
            checkpoint_dir = None
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch,
                            "history": history, "seconds": time.time() - started,
                            "hparams": {"num_nodes": offsets.num_nodes, "embedding_dim": hp["embedding_dim"],
                                        "num_layers": hp["num_layers"]},
                            "split": {"mode": sp.mode, "train_pairs": int(len(pairs_user)),
                                      "test_pairs": int(len(sp.test_user))},
                            "parent_metrics": parent_metrics, "steps": total_steps, "phases": phases},
                           os.path.join(tmp, STATE_FILE))
                if final:
                    e = emb.detach().cpu().numpy().astype(np.float32)
                    np.savez(os.path.join(tmp, EMBEDDINGS_FILE), users=e[: graph.num_users],
                             items=e[item_base : item_base + graph.num_items])
                checkpoint_dir = tmp
            session.report({**entry, "final": final}, checkpoint_dir)
        if final:
            break


def steps_per_pass(pairs: int, world: int, batch: int) -> int:
    """Steps for one pass over `pairs` split across `world` ranks. Every rank takes the same number, or DDP's
    all-reduce would wait for a rank that stopped."""
    return max(1, math.ceil(math.ceil(pairs / world) / batch))


def _resolve(value: Any) -> Any:
    """Large inputs travel through Ray's object store as references."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def update_pairs(sp: Split, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """A warm start's training pairs, chosen by the driver (indices into the split's training pairs)."""
    idx = np.asarray(_resolve(config["pair_index"]), dtype=np.int64)
    return sp.train_user[idx].astype(np.int64), sp.train_item[idx].astype(np.int64)


def train_csr_pairs(csr: Csr) -> tuple[np.ndarray, np.ndarray]:
    """Deduplicated (user, item) training pairs in CSR order."""
    users = np.repeat(np.arange(len(csr.indptr) - 1, dtype=np.int64), np.diff(csr.indptr))
    return users, np.asarray(csr.indices, dtype=np.int64)


def train_loop_per_worker(config: dict) -> None:
    run_worker(config, RayTrainSession())
