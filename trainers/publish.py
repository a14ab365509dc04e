"""Turn a finished training's last checkpoint into a published version (DESIGN 3.3)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import NamedTuple

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
from trainers.data import InterestGraph, Split, load_graph, split
from trainers.train_state import Checkpoint

log = logging.getLogger("trainers.publish")


def _first_of(items: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    """Per item, its lowest group index (-1 when it has none): an item in several categories is listed under one."""
    out = np.full(n, -1, dtype=np.int32)
    if len(items):
        order = np.lexsort((-groups, items))
        out[items[order]] = groups[order]
    return out


def popularity(graph: InterestGraph) -> pa.Table:
    """Recency-weighted popularity per item, with the item's category and brand (-1 when it has none)."""
    score = np.bincount(graph.ui_item, weights=graph.ui_weight, minlength=graph.num_items).astype(np.float32)
    return pa.table({
        "item_idx": pa.array(np.arange(graph.num_items, dtype=np.int32)),
        "score": pa.array(score),
        "category_idx": pa.array(_first_of(graph.ic_item, graph.ic_cat, graph.num_items)),
        "brand_idx": pa.array(_first_of(graph.ib_item, graph.ib_brand, graph.num_items)),
    })


def seen_csr(graph: InterestGraph) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]:
    """Every item each user interacted with, holdout included (serving must not recommend them again), and the
    evidence behind each (weights, events by type, last seen) when the graph keeps it; a holdout file's pairs
    (lightgcn) carry none."""
    users = np.concatenate([graph.ui_user, graph.official_user]).astype(np.int64)
    items = np.concatenate([graph.ui_item, graph.official_item]).astype(np.int64)
    keys, first = np.unique(users * max(graph.num_items, 1) + items, return_index=True)
    rows = keys // max(graph.num_items, 1)
    indptr = np.zeros(graph.num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=graph.num_users), out=indptr[1:])
    indices = (keys - rows * max(graph.num_items, 1)).astype(np.int32)
    if graph.ui_event_counts is None or graph.ui_weight_recent is None:
        return indptr, indices, None
    n_official = len(graph.official_user)

    def aligned(values: np.ndarray) -> np.ndarray:
        padded = np.concatenate([values, np.zeros((n_official, *values.shape[1:]), values.dtype)])
        return padded[first]

    return indptr, indices, {"weight": aligned(graph.ui_weight.astype(np.float32)),
                             "weight_recent": aligned(graph.ui_weight_recent.astype(np.float32)),
                             "counts": aligned(graph.ui_event_counts.astype(np.int32)),
                             "last_ts": aligned(graph.ui_last_ts.astype(np.int64))}


def forget(deleted: np.ndarray, user_keys: pa.Array, user_vectors: np.ndarray, indptr: np.ndarray,
           indices: np.ndarray, model_state: dict, evidence: dict[str, np.ndarray] | None = None
           ) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray, dict, dict[str, np.ndarray] | None]:
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
    for name in [k for k in model_state if k.endswith("embedding.weight")]:
        table = model_state[name].clone()
        table[torch.from_numpy(deleted)] = 0.0  # users are the first rows of the node table
        model_state[name] = table
    new_indptr = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    if evidence is not None:
        evidence = {name: values[keep] for name, values in evidence.items()}
    return pa.array(keys, pa.string()), user_vectors, new_indptr, indices[keep], model_state, evidence


class Published(NamedTuple):
    version: str
    manifest: dict
    as_trained: bool  # model.pt holds the checkpoint's model state as it was (no deleted user blanked in it)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a version takes from the graph, its split and the id maps rather than from training: computed while the
    workers train (`prepare`), so that publishing starts from the checkpoint (0.2-0.3 s of a Taobao publish, the
    popularity baseline's evaluation most of it)."""

    seen: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]  # `seen_csr`
    user_keys: pa.Array
    item_ids: pa.Array
    category_ids: pa.Array
    brand_ids: pa.Array
    popularity: pa.Table
    baseline: dict  # popularity's metrics on the holdout


def prepare(cfg: AppConfig, storage: Storage, graph: InterestGraph, sp: Split) -> Prepared:
    """`graph` and its split as the checkpoint will be trained on them; the id maps must not change before the
    version is published (an update cycle holds data.root's writer lock)."""
    k = cfg.train.k
    return Prepared(
        seen=seen_csr(graph),
        user_keys=idmaps.load(storage, "user").column("key").combine_chunks(),
        item_ids=idmaps.load(storage, "item").column("key"),
        category_ids=idmaps.load(storage, "category").column("key").slice(0, graph.num_categories),
        brand_ids=idmaps.load(storage, "brand").column("key").slice(0, graph.num_brands),
        popularity=popularity(graph),
        baseline=popularity_metrics(graph, sp, k, cfg.train.eval_batch_users, cfg.train.eval_max_users,
                                    cfg.train.seed))


def publish_from_checkpoint(cfg: AppConfig, storage: Storage, checkpoint: Checkpoint, parent: str | None,
                            num_workers: int, graph: InterestGraph | None = None, sp: Split | None = None,
                            curve: bool = True, prepared: Prepared | None = None) -> Published:
    """`graph`, `sp`: the graph the checkpoint was trained on and its split, where the caller has them (a split
    only with its graph). `prepared`: `prepare` of that graph and split, where the caller made it while training.
    `curve=False`: no training curve (an update cycle's history is one evaluation, and drawing it was a third of
    a second of the cycle)."""
    state, emb = checkpoint.state, checkpoint.embeddings
    if sp is not None and graph is None:
        raise ValueError("a split is passed with the graph it splits")
    if emb is None:
        raise RuntimeError("the final checkpoint carries no embeddings")
    graph = graph or load_graph(storage)
    history = state.history
    k = cfg.train.k
    final = next(h for h in reversed(history) if f"recall@{k}" in h)
    if prepared is None:
        prepared = prepare(cfg, storage, graph,
                           sp if sp is not None else split(graph, cfg.train.holdout, cfg.train.holdout_days))
    indptr, indices, evidence = prepared.seen
    user_keys = prepared.user_keys
    user_vectors, model_state = emb["users"], state.model
    # Read now, not while training: a deletion that came in meanwhile reaches this version.
    deleted = deleted_rows(user_keys, load_tombstones(storage))
    if len(deleted):
        user_keys, user_vectors, indptr, indices, model_state, evidence = forget(
            deleted, user_keys, user_vectors, indptr, indices, model_state, evidence)
    artifacts = registry.ModelArtifacts(
        user_keys=user_keys,
        user_vectors=user_vectors,
        item_ids=prepared.item_ids,
        item_vectors=emb["items"],
        seen_indptr=indptr,
        seen_indices=indices,
        popularity=prepared.popularity,
        state_dict=model_state,
        hparams={**state.hparams, "num_users": graph.num_users, "num_items": graph.num_items,
                 "num_categories": graph.num_categories, "num_brands": graph.num_brands},
        config_hash=registry.config_hash(cfg.model_dump(mode="json")),
        metrics={f"recall@{k}": final[f"recall@{k}"], f"ndcg@{k}": final[f"ndcg@{k}"]},
        k=k,
        node_counts={"user": graph.num_users, "item": graph.num_items, "category": graph.num_categories,
                     "brand": graph.num_brands},
        category_ids=prepared.category_ids,
        brand_ids=prepared.brand_ids,
        category_vectors=emb["categories"],
        brand_vectors=emb["brands"],
        parent=parent,
        watermark_ms=graph.watermark_ms,
        # holdout_learned: the refit learned the pairs this version was evaluated on (an update need not again).
        coverage={"runs": graph.runs, "live_through_ms": graph.live_through_ms,
                  **({"holdout_learned": 1} if history[-1].get("refit") else {})},
        seen_evidence=evidence,
        extra={"epochs": history[-1]["epoch"] + 1, "train_seconds": history[-1]["seconds"],
               "split": state.split, "num_workers": num_workers, "history": history,
               "popularity_metrics": prepared.baseline, "eval_users": final.get("eval_users"),
               "refit": history[-1].get("refit")},
        curve_png=curve_png(history, k) if curve else None,
    )
    return Published(*publish_and_prune(cfg, storage, artifacts), as_trained=not len(deleted))


def deleted_rows(user_keys: pa.Array, tombstones: pa.Array) -> np.ndarray:
    """Rows of deleted users: tombstoned keys, and keys the id map already blanked (null)."""
    hit = pc.or_(pc.fill_null(pc.is_in(user_keys, value_set=tombstones), False), pc.is_null(user_keys))
    return np.flatnonzero(hit.to_numpy(zero_copy_only=False))


def blanked(loaded: registry.LoadedVersion, tombstones: pa.Array) -> registry.ModelArtifacts | None:
    """The version again with its deleted users blanked, or None when it holds none: what an update publishes
    when a deletion must reach the next version but training brought nothing publishable."""
    keys = loaded.user_keys.to_arrow()
    deleted = np.flatnonzero(pc.fill_null(pc.is_in(keys, value_set=tombstones), False).to_numpy(zero_copy_only=False))
    if not len(deleted):
        return None
    state = loaded.load_state()
    user_keys, user_vectors, indptr, indices, model_state, evidence = forget(
        deleted, keys, loaded.user_vectors, loaded.seen_indptr, loaded.seen_indices, state["state_dict"],
        loaded.seen_evidence)
    return loaded.artifacts(user_keys=user_keys, user_vectors=user_vectors, seen_indptr=indptr, seen_indices=indices,
                            seen_evidence=evidence, state_dict=model_state,
                            extra={**loaded.extra, "blanked_from": loaded.version})


def publish_and_prune(cfg: AppConfig, storage: Storage, artifacts: registry.ModelArtifacts) -> tuple[str, dict]:
    """Publish, then apply retention: versions past registry.keep_versions go, and so does every older version
    that still holds a deleted user (the new one holds none)."""
    registry.remove_stale_staging(storage)  # folders of publishers that died mid-write, a day old or more
    n_items = len(artifacts.item_vectors)
    if artifacts.item_index is None and n_items >= cfg.serve.index_min_items:
        from registry.item_index import build

        started = time.time()
        artifacts = dataclasses.replace(artifacts, item_index=build(artifacts.item_vectors))
        log.info("built the item index over %d items in %.1f s", n_items, time.time() - started)
    version = registry.publish(storage, artifacts)
    registry.prune(storage, cfg.registry.keep_versions, set(load_tombstones(storage).to_pylist()))
    return version, registry.read_manifest(storage, version)
