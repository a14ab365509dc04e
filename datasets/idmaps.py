"""Append-only maps from external ids to dense indices, one per node type: old indices never change."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from core.storage import IDMAPS, Storage
from datasets import schema as s


def load(storage: Storage, node_type: str) -> pa.Table:
    """(key, idx) for every id ever seen, in index order."""
    table = storage.read_parquet(storage.list_files(IDMAPS, node_type, suffix=".parquet"), schema=s.IDMAP_SCHEMA)
    return table.sort_by(s.INDEX)


def extend(storage: Storage, node_type: str, current: pa.Table, candidates: pa.Array, run_id: str) -> pa.Table:
    """Append the candidates not yet mapped (sorted, so the result does not depend on task order)."""
    fresh = pc.unique(pc.drop_null(candidates))
    fresh = fresh.filter(pc.invert(pc.is_in(fresh, value_set=current.column(s.KEY))))
    if not len(fresh):
        return current
    keys = pc.take(fresh, pc.array_sort_indices(fresh))
    start = current.num_rows
    part = pa.table({s.KEY: keys, s.INDEX: pa.array(range(start, start + len(keys)), pa.int64())},
                    schema=s.IDMAP_SCHEMA)
    storage.write_parquet(storage.path(IDMAPS, node_type, f"part-{start:012d}-{run_id}.parquet"), part)
    return pa.concat_tables([current, part])


def lookup(mapping: pa.Table, keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Dense index of each key (null where unmapped)."""
    pos = pc.index_in(keys, value_set=mapping.column(s.KEY))
    return pc.take(mapping.column(s.INDEX), pos)
