"""`python -m bench.train_scale`: one measured training epoch at 1M users, 1M items, 50M events, with 1 and 2 workers.

A synthetic interest graph at that scale is written in ingestion's storage layout (`graph/`: one Parquet file of
user-item edges per shard, item-category and item-brand edges, `meta.json`), so training reads it exactly as it
reads an ingested log: shoppers with one to three interest categories (power-law category and item popularity,
heavy-tailed activity, one event in ten outside the shopper's interests), 5k categories, 20k brands, events over
`--days` days. Ingestion at 50M events is measured by `bench.ingest`; this bench starts where training starts.

Then the product's training path, unchanged (`trainers.train`: Ray Train workers, the per-worker loop, its steps
over sampled neighbourhoods, the evaluation), runs one epoch over every training pair, once with `--workers` 1
(both cores to it) and once with 2. Reported per run: the epoch's wall seconds (`epoch_s`, the first epoch's end
as the worker reports it, training only), the worker's set-up (graph load, split, adjacency, spectral start),
steps, the machine's peak memory while the run lasted (every process, Ray's included), and Recall@20 / NDCG@20
after that one epoch on the held-out last day (pairs first seen that day, for shoppers with older pairs; a seeded
sample of `--eval-users` shoppers) against popularity on the same sample. Prints JSON lines and a final list.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.train_gowalla import PeakMemory
from core.config import parse_config
from core.runtime import ensure_ray
from core.storage import GRAPH, Storage
from datasets import schema as s

OUT = Path(__file__).resolve().parent / "out" / "scale"
DAY_MS = 86_400_000
START_MS = 1_764_547_200_000  # 2025-12-01 UTC: a fixed calendar, so the graph is the same on every run
EVENT_SHARE = (0.8, 0.1, 0.05, 0.03, 0.02)  # view, click, cart, fav, purchase (schema.EVENT_TYPES order)


def _events(rng: np.random.Generator, n: int, cum_activity: np.ndarray, interests: np.ndarray,
            cum_category: np.ndarray, cat_start: np.ndarray, cat_size: np.ndarray,
            days: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, ts, event code) of `n` events."""
    users = np.searchsorted(cum_activity, rng.random(n) * cum_activity[-1], side="right")
    cats = interests[users, rng.integers(0, interests.shape[1], n)]
    explore = rng.random(n) < 0.1
    cats[explore] = np.searchsorted(cum_category, rng.random(int(explore.sum())) * cum_category[-1], side="right")
    # Within a category the first items are the popular ones: rank = size * u^3.
    items = cat_start[cats] + (cat_size[cats] * rng.random(n) ** 3).astype(np.int64)
    ts = START_MS + rng.integers(0, days * DAY_MS, n)
    event = np.searchsorted(np.cumsum(EVENT_SHARE), rng.random(n) * 0.999999, side="right")
    return users, items, ts, event


def synthetic_graph(root: Path, users: int, items: int, events: int, days: int, seed: int = 0,
                    shards: int = 8) -> dict:
    """Write the graph under `root` in ingestion's layout; returns its counts."""
    rng = np.random.default_rng(seed)
    cats, brands = 5_000, 20_000
    cat_weight = 1.0 / np.arange(1, cats + 1) ** 0.8
    item_cat = np.sort(np.searchsorted(np.cumsum(cat_weight), rng.random(items) * cat_weight.sum(), side="right"))
    cat_size = np.bincount(item_cat, minlength=cats)
    cat_start = np.concatenate([[0], np.cumsum(cat_size)[:-1]])
    popular = np.where(cat_size > 0, cat_weight, 0.0)  # a category without items is nobody's interest
    cum_category = np.cumsum(popular)
    interests = np.searchsorted(cum_category, rng.random((users, 3)) * cum_category[-1], side="right")
    n_interests = rng.integers(1, 4, users)
    interests[n_interests < 2, 1] = interests[n_interests < 2, 0]
    interests[n_interests < 3, 2] = interests[n_interests < 3, 1]
    cum_activity = np.cumsum(rng.pareto(1.5, users) + 1.0)
    keys, stamps, codes = [], [], []
    for start in range(0, events, 10_000_000):
        u, i, ts, ev = _events(rng, min(10_000_000, events - start), cum_activity, interests, cum_category,
                               cat_start, cat_size, days)
        keys.append(u * items + i)
        stamps.append(ts)
        codes.append(ev.astype(np.int8))
    key, ts, ev = np.concatenate(keys), np.concatenate(stamps), np.concatenate(codes)
    del keys, stamps, codes
    order = np.argsort(key, kind="stable")
    key, ts, ev = key[order], ts[order], ev[order]
    del order
    first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    pair_key = key[first]
    del key
    weights = np.asarray([1.0, 2.0, 4.0, 3.0, 8.0], np.float32)[ev]  # the shipped data.event_weights
    columns = {
        s.USER_IDX: pair_key // items, s.ITEM_IDX: pair_key % items,
        s.WEIGHT: np.minimum(np.add.reduceat(weights, first), 24.0).astype(np.float32),
        s.COUNT: np.diff(np.concatenate([first, [len(ev)]])).astype(np.int32),
        s.FIRST_TS: np.minimum.reduceat(ts, first), s.LAST_TS: np.maximum.reduceat(ts, first),
        s.LAST_RUN: np.ones(len(first), np.int32),
    }
    columns[s.WEIGHT_RECENT] = columns[s.WEIGHT]
    for code, name in enumerate(s.EVENT_COUNTS):
        columns[name] = np.add.reduceat((ev == code).astype(np.int32), first)
    del weights, ts, ev
    storage = Storage(str(root))
    shard_of = columns[s.USER_IDX] % shards
    for shard in range(shards):
        mine = shard_of == shard
        table = pa.table({name: pa.array(values[mine], type=s.USER_ITEM_EDGE_SCHEMA.field(name).type)
                          for name, values in columns.items()}, schema=s.USER_ITEM_EDGE_SCHEMA)
        storage.write_parquet(storage.path(GRAPH, s.UI_EDGES, f"shard={shard}.parquet"), table)
    all_items = np.arange(items, dtype=np.int64)
    storage.write_parquet(storage.path(GRAPH, s.ITEM_CATEGORY_FILE),
                          pa.table({s.ITEM_IDX: all_items, s.CATEGORY_IDX: item_cat.astype(np.int64)}))
    item_brand = ((item_cat * 4 + rng.integers(0, 4, items)) % brands).astype(np.int64)  # brands within categories
    storage.write_parquet(storage.path(GRAPH, s.ITEM_BRAND_FILE), pa.table({s.ITEM_IDX: all_items,
                                                                           s.BRAND_IDX: item_brand}))
    counts = {"user": users, "item": items, "category": cats, "brand": brands}
    storage.write_json_atomic(storage.path(GRAPH, s.GRAPH_META), {
        "watermark_ms": int(columns[s.LAST_TS].max()), "formats": ["events"], "has_holdout": False,
        "num_nodes": counts, "user_item_edges": int(len(first)), "runs": 1, "live_through_ms": None})
    return {"pairs": int(len(first)), "users": users, "items": items, "categories": cats, "brands": brands}


def train_once(root: Path, workers: int, args: argparse.Namespace) -> dict:
    """One epoch through `trainers.train`'s Ray Train path (no publishing: the version is not what is measured)."""
    from trainers.train import TrainOptions, fitted, worker_inputs

    cpus = 2.0 / workers  # the machine's two cores, whatever the number of workers
    cfg = parse_config({"data": {"root": str(root)}, "cluster": {"num_cpus": 2},
                        "train": {"num_workers": workers, "epochs": 1, "embedding_dim": args.dim,
                                  "batch_size": args.batch_size, "cpus_per_worker": cpus,
                                  "threads_per_worker": max(1, int(cpus)), "eval_max_users": args.eval_users,
                                  "refit": False}})
    ensure_ray(cfg)
    opts = TrainOptions(num_workers=workers)
    started = time.time()
    with PeakMemory() as mem:
        inputs = worker_inputs(cfg, opts, started, max_steps=args.max_steps)
        with fitted(cfg, opts, inputs, f"scale-{workers}w-{int(started)}") as (ckpt, _):
            state = ckpt.state
    entry = state.history[-1]
    k = cfg.train.k
    # A probe (--max-steps) stops inside the epoch: its seconds are a partial epoch's, labelled as such.
    label = "epoch_s" if args.max_steps is None else "partial_epoch_s"
    return {"workers": workers, "threads_per_worker": max(1, int(cpus)), label: entry["seconds"],
            "steps": entry["steps"], "batch_per_worker": args.batch_size, "setup_s": state.phases.get("setup"),
            "eval_s": state.phases.get("eval"), f"recall@{k}": round(entry[f"recall@{k}"], 4),
            f"ndcg@{k}": round(entry[f"ndcg@{k}"], 4), "eval_users": entry["eval_users"],
            "run_s": round(time.time() - started, 1), "peak_gib": mem.gib}


def popularity(root: Path, eval_users: int) -> dict:
    """Popularity on the same held-out sample, in a process of its own: the whole graph it loads (4 GB at 38M pairs)
    is given back before the training workers need the memory."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_popularity, (root, eval_users))


def _popularity(root: Path, eval_users: int) -> dict:
    from trainers.baselines import popularity_metrics
    from trainers.data import load_graph, split

    graph = load_graph(Storage(str(root)))
    sp = split(graph, "auto", 1.0)
    out = popularity_metrics(graph, sp, 20, max_users=eval_users, seed=0)
    return {"ranker": "popularity", **{k: round(v, 4) for k, v in out.items()},
            "train_pairs": int(len(sp.train_user)), "test_pairs": int(len(sp.test_user))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_scale", description=__doc__)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=50_000_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16384, help="per worker")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts, one run each")
    p.add_argument("--eval-users", type=int, default=10_000)
    p.add_argument("--max-steps", type=int, default=None,
                   help="a probe: stop after this many steps per worker (a partial epoch, reported as such)")
    p.add_argument("--regenerate", action="store_true", help="write the graph again even if it is there")
    args = p.parse_args(argv)
    root = OUT / f"u{args.users}-i{args.items}-e{args.events}-d{args.days}"
    results = []
    if args.regenerate or not Storage(str(root)).exists(GRAPH, s.GRAPH_META):
        started = time.time()
        with PeakMemory() as mem:
            made = synthetic_graph(root, args.users, args.items, args.events, args.days)
        results.append({"graph": str(root), **made, "generate_s": round(time.time() - started, 1),
                        "peak_gib": mem.gib})
        print(json.dumps(results[-1]), flush=True)
    if args.max_steps is None:  # a probe measures steps, not the baseline
        results.append(popularity(root, args.eval_users))
        print(json.dumps(results[-1]), flush=True)
    for workers in (int(w) for w in args.workers.split(",")):
        results.append(train_once(root, workers, args))
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
