"""Forgetting users: the stored rows of tombstoned users (DELETE /users) are removed from every table that holds them.

Runs at the start of an ingestion that finds new tombstones. Each file is rewritten atomically without the users'
rows, so an interrupted purge leaves whole files and the next ingestion simply purges again.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from core.storage import HOLDOUT, INTERACTIONS, REJECTS, Storage
from datasets import schema as s
from datasets.pseudonym import shard_of_keys
from datasets.stage import SHARD


def _without(storage: Storage, path: str, keys: pa.Array) -> int:
    table = storage.read_parquet([path])
    hit = pc.fill_null(pc.is_in(table.column(s.USER_KEY), value_set=keys), False)
    removed = int(pc.sum(hit).as_py() or 0)
    if removed:
        storage.write_parquet(path, table.filter(pc.invert(hit)), durable=True)
    return removed


def purge_users(storage: Storage, user_keys: list[str], shards: int) -> int:
    """Remove these users' rows from interactions/, holdout/ and rejects/; returns how many rows went."""
    if not user_keys:
        return 0
    keys = pa.array(sorted(user_keys), pa.string())
    paths = []
    for shard in sorted(set(shard_of_keys(user_keys, shards).tolist())):  # users live in one shard each
        for folder in (INTERACTIONS, HOLDOUT):
            paths += storage.list_files(folder, f"{SHARD}={shard}", suffix=".parquet")
    paths += storage.list_files(REJECTS, suffix=".parquet")
    return sum(_without(storage, p, keys) for p in paths)
