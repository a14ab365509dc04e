"""Turn a finished training's last checkpoint into a published version (DESIGN 3.3)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

import registry
from core.config import AppConfig
from core.storage import Storage
from datasets import idmaps
from datasets.tombstones import load_tombstones
from trainers.baselines import popularity_metrics
from trainers.curve import curve_png
from trainers.data import InterestGraph, load_graph, split
from trainers.sampling import csr_from_pairs
from trainers.train_state import TrainState, load_embeddings


def popularity(graph: InterestGraph) -> pa.Table:
    """Recency-weighted popularity per item, with the item's category (-1 when it has none)."""
    score = np.bincount(graph.ui_item, weights=graph.ui_weight, minlength=graph.num_items).astype(np.float32)
    category = np.full(graph.num_items, -1, dtype=np.int32)
    if len(graph.ic_item):
        # An item in several categories is listed under its first (lowest index).
        order = np.lexsort((-graph.ic_cat, graph.ic_item))
        category[graph.ic_item[order]] = graph.ic_cat[order]
    return pa.table({
        "item_idx": pa.array(np.arange(graph.num_items, dtype=np.int32)),
        "score": pa.array(score),
        "category_idx": pa.array(category),
    })


def seen_csr(graph: InterestGraph) -> tuple[np.ndarray, np.ndarray]:
    """Every item each user interacted with, holdout included: serving must not recommend them again."""
    users = np.concatenate([graph.ui_user, graph.official_user])
    items = np.concatenate([graph.ui_item, graph.official_item])
    csr = csr_from_pairs(users, items, graph.num_users, graph.num_items)
    return csr.indptr.astype(np.int64), csr.indices.astype(np.int32)


def forget(deleted: np.ndarray, user_keys: pa.Array, user_vectors: np.ndarray, indptr: np.ndarray,
           indices: np.ndarray, model_state: dict) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Blank tombstoned users' rows: null key, zero vectors, no seen items, zero parameters.

    Rows stay in place because row i is user index i for warm starts (indices are append-only); nothing in the
    version names the user or keeps what was learned from them.
    """
    keys = np.array(user_keys.to_pylist(), dtype=object)
    keys[deleted] = None
    user_vectors = user_vectors.copy()
    user_vectors[deleted] = 0.0
    lengths = np.diff(indptr)
    keep = np.repeat(~np.isin(np.arange(len(lengths)), deleted), lengths)
    lengths[deleted] = 0
    model_state = dict(model_state)
    name = next(k for k in model_state if k.endswith("embedding.weight"))
    table = model_state[name].clone()
    table[torch.from_numpy(deleted)] = 0.0  # users are the first rows of the node table
    model_state[name] = table
    new_indptr = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    return pa.array(keys, pa.string()), user_vectors, new_indptr, indices[keep], model_state


def publish_from_checkpoint(cfg: AppConfig, storage: Storage, checkpoint_dir: str, parent: str | None,
                            num_workers: int, graph: InterestGraph | None = None) -> tuple[str, dict]:
    state = TrainState.load(checkpoint_dir)
    emb = load_embeddings(checkpoint_dir)
    graph = graph or load_graph(storage)
    history = state.history
    k = cfg.train.k
    final = next(h for h in reversed(history) if f"recall@{k}" in h)
    indptr, indices = seen_csr(graph)
    user_keys = idmaps.load(storage, "user").column("key").combine_chunks()
    user_vectors, model_state = emb["users"], state.model
    deleted = np.flatnonzero(pc.fill_null(pc.is_in(user_keys, value_set=load_tombstones(storage)), False)
                             .to_numpy(zero_copy_only=False))
    if len(deleted):
        user_keys, user_vectors, indptr, indices, model_state = forget(
            deleted, user_keys, user_vectors, indptr, indices, model_state)
    baseline = popularity_metrics(graph, split(graph, cfg.train.holdout, cfg.train.holdout_days), k,
                                  cfg.train.eval_batch_users)
    artifacts = registry.ModelArtifacts(
        user_keys=user_keys,
        user_vectors=user_vectors,
        item_ids=idmaps.load(storage, "item").column("key"),
        item_vectors=emb["items"],
        seen_indptr=indptr,
        seen_indices=indices,
        popularity=popularity(graph),
        state_dict=model_state,
        hparams={**state.hparams, "num_users": graph.num_users, "num_items": graph.num_items,
                 "num_categories": graph.num_categories, "num_brands": graph.num_brands},
        config_hash=registry.config_hash(cfg.model_dump(mode="json")),
        metrics={f"recall@{k}": final[f"recall@{k}"], f"ndcg@{k}": final[f"ndcg@{k}"]},
        k=k,
        node_counts={"user": graph.num_users, "item": graph.num_items, "category": graph.num_categories,
                     "brand": graph.num_brands},
        category_ids=idmaps.load(storage, "category").column("key").slice(0, graph.num_categories),
        brand_ids=idmaps.load(storage, "brand").column("key").slice(0, graph.num_brands),
        category_vectors=emb["categories"],
        brand_vectors=emb["brands"],
        parent=parent,
        watermark_ms=graph.watermark_ms,
        extra={"epochs": history[-1]["epoch"] + 1, "train_seconds": history[-1]["seconds"],
               "split": state.split, "num_workers": num_workers, "history": history,
               "popularity_metrics": baseline, "eval_users": final.get("eval_users")},
        curve_png=curve_png(history, k),
    )
    registry.remove_stale_staging(storage)  # folders of publishers that died mid-write, a day old or more
    version = registry.publish(storage, artifacts)
    return version, registry.read_manifest(storage, version)
