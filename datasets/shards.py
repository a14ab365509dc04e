"""Per-shard work after staging: exact-duplicate removal, appending to interactions/, and the shard's graph edges.

Each function handles one user shard and runs as a Ray task; shards never share a user, so they never meet.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.storage import GRAPH, HOLDOUT, INTERACTIONS, TMP, Storage
from datasets import idmaps
from datasets import schema as s
from datasets.stage import SHARD, STAGED_ACCEPTED
from datasets.state import run_of

DEDUPE_KEY = (s.USER_KEY, s.ITEM_ID, s.EVENT, s.TS)


def first_occurrence(keys: pa.Table) -> np.ndarray:
    """Mask of rows that are the first of their (user, item, event, ts) group, in table order."""
    n = keys.num_rows
    if n == 0:
        return np.zeros(0, dtype=bool)
    arrays = []
    for name in keys.column_names:
        col = keys.column(name)
        if pa.types.is_timestamp(col.type):
            arrays.append(col.cast(pa.int64()).to_numpy())
        else:
            arrays.append(pc.dictionary_encode(col).combine_chunks().indices.to_numpy())
    order = np.lexsort(arrays[::-1])  # stable: among equals the earlier row comes first
    same = np.ones(n - 1, dtype=bool)
    for a in arrays:
        sa = a[order]
        same &= sa[1:] == sa[:-1]
    keep_sorted = np.concatenate(([True], ~same))
    keep = np.empty(n, dtype=bool)
    keep[order] = keep_sorted
    return keep


def append_shard(storage: Storage, run_id: str, shard: int) -> dict:
    """Dedupe this run's staged rows against themselves and what the shard holds; append the new ones."""
    staged = storage.list_files(TMP, run_id, STAGED_ACCEPTED, f"{SHARD}={shard}", suffix=".parquet")
    out = {"shard": shard, "accepted": 0, "duplicates": 0, "by_event": {}, "holdout": 0,
           "users": pa.array([], pa.string()), "items": pa.array([], pa.string()),
           "categories": pa.array([], pa.string()), "brands": pa.array([], pa.string())}
    if not staged:
        return out
    new = storage.read_parquet(staged)
    kept_parts = []
    for split, folder in (("train", INTERACTIONS), ("holdout", HOLDOUT)):
        rows = new.filter(pc.equal(new.column(s.SPLIT), split))
        if not rows.num_rows:
            continue
        old = storage.read_parquet(storage.list_files(folder, f"{SHARD}={shard}", suffix=".parquet"),
                                   columns=list(DEDUPE_KEY), schema=s.INTERACTION_SCHEMA)
        keys = pa.concat_tables([old, rows.select(list(DEDUPE_KEY))])
        keep = first_occurrence(keys)[old.num_rows:]
        rows = rows.filter(pa.array(keep)).drop_columns([s.SOURCE, s.LINE, s.SPLIT])
        # Left in arrival order (files are in time order): sorting 1M+ string keys per shard costs more than the
        # whole dedupe, and nothing downstream needs it.
        rows = rows.cast(s.INTERACTION_SCHEMA)
        out["duplicates"] += int((~keep).sum())
        storage.write_parquet(storage.path(folder, f"{SHARD}={shard}", f"part-{run_id}.parquet"), rows)
        if split == "train":
            out["by_event"] = {d["values"]: d["counts"] for d in pc.value_counts(rows.column(s.EVENT)).to_pylist()}
        else:
            out["holdout"] = rows.num_rows
        out["accepted"] += rows.num_rows
        kept_parts.append(rows)
    kept = pa.concat_tables(kept_parts)
    for field, col in (("users", s.USER_KEY), ("items", s.ITEM_ID), ("categories", s.CATEGORY_ID),
                       ("brands", s.BRAND_ID)):
        out[field] = pc.unique(pc.drop_null(kept.column(col).combine_chunks()))
    return out


def shard_edges(storage: Storage, shard: int, users: pa.Table, items: pa.Table, categories: pa.Table,
                brands: pa.Table, event_weights: dict[str, float], half_life_days: float, watermark_ms: int,
                max_edge_weight: float, arrival: dict[str, int], recent_half_life_days: float = 3.0) -> dict:
    """User-item edges of one shard, rebuilt from all its interactions, and its item-attribute pairs.

    A pair's weight sums its events' weights (by type, decayed by age), capped at `max_edge_weight` so that one user
    cannot make an item popular alone; `weight_recent` is the same with a shorter half-life. Each pair keeps its
    events by type, and the last run that brought it one (`arrival` maps a run id to its position: what is new to a
    version is judged by arrival, not by event time).
    """
    files = storage.list_files(INTERACTIONS, f"{SHARD}={shard}", suffix=".parquet")
    cols = [s.USER_KEY, s.ITEM_ID, s.EVENT, s.TS, s.CATEGORY_ID, s.BRAND_ID]
    parts = [storage.read_parquet([f], columns=cols, schema=s.INTERACTION_SCHEMA) for f in files]
    rows = pa.concat_tables(parts) if parts else s.INTERACTION_SCHEMA.empty_table().select(cols)
    run = np.repeat(np.array([arrival.get(run_of(f) or "", 0) for f in files], dtype=np.int32),
                    [p.num_rows for p in parts]) if parts else np.zeros(0, np.int32)
    names = list(event_weights)
    base = pc.take(pa.array([event_weights[n] for n in names], pa.float64()),
                   pc.index_in(rows.column(s.EVENT), value_set=pa.array(names)))
    age_days = np.maximum((watermark_ms - rows.column(s.TS).cast(pa.int64()).to_numpy()) / 86_400_000.0, 0.0)
    base = pc.fill_null(base, 0.0).to_numpy()
    events = rows.column(s.EVENT)
    table = pa.table({
        s.USER_IDX: idmaps.lookup(users, rows.column(s.USER_KEY)),
        s.ITEM_IDX: idmaps.lookup(items, rows.column(s.ITEM_ID)),
        s.WEIGHT: pa.array(base * np.power(0.5, age_days / half_life_days), pa.float64()),
        s.WEIGHT_RECENT: pa.array(base * np.power(0.5, age_days / recent_half_life_days), pa.float64()),
        s.TS: rows.column(s.TS),
        s.LAST_RUN: pa.array(run, pa.int32()),
        **{n: pc.cast(pc.equal(events, e), pa.int32()) for n, e in zip(s.EVENT_COUNTS, s.EVENT_TYPES, strict=True)},
    })
    edges = table.group_by([s.USER_IDX, s.ITEM_IDX]).aggregate(
        [(s.WEIGHT, "sum"), (s.WEIGHT, "count"), (s.TS, "min"), (s.TS, "max"), (s.LAST_RUN, "max"),
         (s.WEIGHT_RECENT, "sum"), *[(n, "sum") for n in s.EVENT_COUNTS]])
    edges = pa.table({
        s.USER_IDX: edges.column(s.USER_IDX),
        s.ITEM_IDX: edges.column(s.ITEM_IDX),
        s.WEIGHT: pc.min_element_wise(edges.column(f"{s.WEIGHT}_sum"), max_edge_weight).cast(pa.float32()),
        s.COUNT: edges.column(f"{s.WEIGHT}_count").cast(pa.int32()),
        s.FIRST_TS: edges.column(f"{s.TS}_min"),
        s.LAST_TS: edges.column(f"{s.TS}_max"),
        s.LAST_RUN: edges.column(f"{s.LAST_RUN}_max"),
        s.WEIGHT_RECENT: pc.min_element_wise(edges.column(f"{s.WEIGHT_RECENT}_sum"),
                                             max_edge_weight).cast(pa.float32()),
        **{n: edges.column(f"{n}_sum").cast(pa.int32()) for n in s.EVENT_COUNTS},
    }, schema=s.USER_ITEM_EDGE_SCHEMA).sort_by([(s.USER_IDX, "ascending"), (s.ITEM_IDX, "ascending")])
    storage.write_parquet(storage.path(GRAPH, s.UI_EDGES, f"{SHARD}={shard}.parquet"), edges)
    pairs = {}
    for name, col, mapping in (("category", s.CATEGORY_ID, categories), ("brand", s.BRAND_ID, brands)):
        sub = rows.select([s.ITEM_ID, col]).filter(pc.is_valid(rows.column(col)))
        sub = sub.group_by([s.ITEM_ID, col]).aggregate([])
        pairs[name] = pa.table({
            s.ITEM_IDX: idmaps.lookup(items, sub.column(s.ITEM_ID)),
            f"{name}_idx": idmaps.lookup(mapping, sub.column(col)),
        })
    return {"shard": shard, "edges": edges.num_rows, "pairs": pairs}
