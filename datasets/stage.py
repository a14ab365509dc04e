"""Per-block work of ingestion, run inside Ray Data: validate, pseudonymise, shard by user, stage to Parquet.

Raw user ids exist only in memory here; every row leaves this step with a `user_key` instead.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.storage import TMP, Storage
from datasets import schema as s
from datasets.pseudonym import pseudonymise, shard_of_keys
from datasets.schema import Reason
from datasets.validate import Rules, validate

STAGED_ACCEPTED = "accepted"
STAGED_REJECTS = "rejects"
SHARD = "shard"


def pseudonymise_column(raw: pa.Array | pa.ChunkedArray, key: bytes, shards: int) -> tuple[pa.Array, pa.Array]:
    """(user_key, shard) per row; ids that are null or carry undecodable bytes stay null (shard 0)."""
    encoded = pc.dictionary_encode(raw)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    values = encoded.dictionary.to_pylist()
    keys = [None if "\ufffd" in v else pseudonymise(v, key) for v in values]
    shard = shard_of_keys([k or "0" for k in keys], shards)
    return pc.take(pa.array(keys, pa.string()), encoded.indices), pc.take(pa.array(shard), encoded.indices)


def user_keys_of(rows: pa.Table, key: bytes, shards: int) -> tuple[pa.Array, pa.Array]:
    """(user_key, shard) per row: the row's own `user_key` where it came pseudonymised, else its `user_id`'s."""
    derived, shard = pseudonymise_column(rows.column(s.USER_ID), key, shards)
    given = rows.column(s.USER_KEY).combine_chunks()
    if given.null_count == len(given):
        return derived, shard
    keys = pc.coalesce(given, derived)
    encoded = pc.dictionary_encode(keys)
    by_key = shard_of_keys([k or "0" for k in encoded.dictionary.to_pylist()], shards)
    return keys, pc.take(pa.array(by_key), encoded.indices)


class StageBlock:
    """Callable for `Dataset.map_batches`: one block of raw rows in, one row of counts out."""

    def __init__(self, storage: Storage, run_id: str, key: bytes, rules: Rules, shards: int, now_ms: int,
                 tombstones: pa.Array) -> None:
        self.storage, self.run_id, self.key = storage, run_id, key
        self.rules, self.shards, self.now_ms, self.tombstones = rules, shards, now_ms, tombstones

    def __call__(self, raw: pa.Table) -> pa.Table:
        accepted, rejected = validate(raw, self.rules, self.now_ms)
        user_key, shard = user_keys_of(accepted, self.key, self.shards)
        accepted = accepted.drop_columns([s.USER_ID, s.USER_KEY]).add_column(0, s.USER_KEY, user_key)
        rejected_key, _ = user_keys_of(rejected, self.key, self.shards)
        rejected = rejected.drop_columns([s.USER_ID, s.USER_KEY]).add_column(4, s.USER_KEY, rejected_key)
        if len(self.tombstones):
            deleted = pc.is_in(accepted.column(s.USER_KEY), value_set=self.tombstones)
            gone = accepted.filter(deleted)
            accepted, shard = accepted.filter(pc.invert(deleted)), shard.filter(pc.invert(deleted))
            rejected = pa.concat_tables([rejected, _as_rejects(gone, Reason.DELETED_USER)])
        name = self._block_name(raw)
        if accepted.num_rows:
            accepted = accepted.append_column(SHARD, shard)
            for sh in np.unique(shard.to_numpy()):
                part = accepted.filter(pc.equal(accepted.column(SHARD), int(sh))).drop_columns([SHARD])
                self.storage.write_parquet(
                    self.storage.path(TMP, self.run_id, STAGED_ACCEPTED, f"{SHARD}={sh}", f"{name}.parquet"), part)
        if rejected.num_rows:
            self.storage.write_parquet(
                self.storage.path(TMP, self.run_id, STAGED_REJECTS, f"{name}.parquet"),
                rejected.select(s.REJECT_SCHEMA.names).cast(s.REJECT_SCHEMA))
        train = accepted.filter(pc.equal(accepted.column(s.SPLIT), "train"))
        ts = train.column(s.TS).cast(pa.int64())
        by_reason = pc.value_counts(rejected.column(s.REASON)).to_pylist() if rejected.num_rows else []
        return pa.table({
            "rows": [raw.num_rows],
            "accepted": [accepted.num_rows],
            "rejected": [rejected.num_rows],
            "by_reason": [json.dumps({d["values"]: d["counts"] for d in by_reason})],
            "min_ts": [pc.min(ts).as_py() if len(ts) else None],
            "max_ts": [pc.max(ts).as_py() if len(ts) else None],
        })

    @staticmethod
    def _block_name(raw: pa.Table) -> str:
        # Deterministic per block, so a retried task overwrites its own files instead of adding copies.
        first = raw.slice(0, 1).to_pylist()[0] if raw.num_rows else {}
        lines = raw.column(s.LINE)
        ident = f"{first.get(s.SOURCE)}|{pc.min(lines)}|{pc.max(lines)}|{raw.num_rows}|{first.get(s.ITEM_ID)}"
        return hashlib.sha1(ident.encode()).hexdigest()[:20]


def _as_rejects(accepted: pa.Table, reason: str) -> pa.Table:
    n = accepted.num_rows
    return pa.table({
        s.REASON: pa.array([reason] * n, pa.string()),
        s.DETAIL: pa.nulls(n, pa.string()),
        s.SOURCE: accepted.column(s.SOURCE),
        s.LINE: accepted.column(s.LINE),
        s.USER_KEY: accepted.column(s.USER_KEY),
        s.ITEM_ID: accepted.column(s.ITEM_ID),
        s.EVENT: accepted.column(s.EVENT),
        s.TS: pc.cast(accepted.column(s.TS).cast(pa.int64()), pa.string()),
        s.CATEGORY_ID: accepted.column(s.CATEGORY_ID),
        s.BRAND_ID: accepted.column(s.BRAND_ID),
        s.PRICE: pc.cast(accepted.column(s.PRICE), pa.string()),
    })


def now_ms() -> int:
    return int(time.time() * 1000)
