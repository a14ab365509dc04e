"""Per-block work of ingestion, run inside Ray Data: validate, pseudonymise, shard by user, stage to Parquet.

Raw user ids exist only in memory here; every row leaves this step with a `user_key` instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.storage import TMP, Storage
from datasets import schema as s
from datasets.pseudonym import pseudonymise, shard_of_keys
from datasets.schema import Reason
from datasets.validate import USER_KEY_RE, Rules, validate

STAGED_ACCEPTED = "accepted"
STAGED_REJECTS = "rejects"
SHARD = "shard"

log = logging.getLogger(__name__)


def pseudonymise_column(raw: pa.Array | pa.ChunkedArray, key: bytes, shards: int, skip_replaced: bool = True
                        ) -> tuple[pa.Array, pa.Array]:
    """(user_key, shard) per row; null ids stay null (shard 0), and so, with `skip_replaced`, do ids holding a
    replacement character (a rejected line's undecodable bytes: their key would not be the user's)."""
    encoded = pc.dictionary_encode(raw)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    values = encoded.dictionary.to_pylist()
    keys = [None if skip_replaced and "\ufffd" in v else pseudonymise(v, key) for v in values]
    shard = shard_of_keys([k or "0" for k in keys], shards)
    return pc.take(pa.array(keys, pa.string()), encoded.indices), pc.take(pa.array(shard), encoded.indices)


def user_keys_of(rows: pa.Table, key: bytes, shards: int, skip_replaced: bool = True) -> tuple[pa.Array, pa.Array]:
    """(user_key, shard) per row: the row's own `user_key` where it came pseudonymised, else its `user_id`'s.

    A given key that is no pseudonym (32 lowercase hex characters) is dropped: it could be a raw id, which must not
    reach disk, and it has no shard. Validation rejects such rows (bad_user_key), so only rejects meet this.
    """
    derived, shard = pseudonymise_column(rows.column(s.USER_ID), key, shards, skip_replaced)
    given = rows.column(s.USER_KEY).combine_chunks()
    if given.null_count == len(given):
        return derived, shard
    given = pc.if_else(pc.match_substring_regex(given, USER_KEY_RE), given, pa.scalar(None, pa.string()))
    keys = pc.coalesce(given, derived)
    encoded = pc.dictionary_encode(keys)
    by_key = shard_of_keys([k or "0" for k in encoded.dictionary.to_pylist()], shards)
    return keys, pc.take(pa.array(by_key), encoded.indices)


@dataclass
class _Staged:
    parts: list[tuple[int, pa.Table]]  # (shard, accepted rows of that shard)
    rejects: pa.Table  # REJECT_SCHEMA
    counts: dict


class StageBlock:
    """Callable for `Dataset.map_batches`: one block of raw rows in, one row of counts out.

    Nothing in the rows' content makes it raise: if validating, pseudonymising or shaping a block fails anyway
    (a bug the rules did not foresee), every row of the block is rejected as `unreadable` with the error as the
    detail, so `rows = accepted + rejected` still holds. Storage errors while writing staged files do raise.
    """

    def __init__(self, storage: Storage, run_id: str, key: bytes, rules: Rules, shards: int, now_ms: int,
                 tombstones: pa.Array) -> None:
        self.storage, self.run_id, self.key = storage, run_id, key
        self.rules, self.shards, self.now_ms, self.tombstones = rules, shards, now_ms, tombstones

    def __call__(self, raw: pa.Table) -> pa.Table:
        try:
            staged = self._split(raw)
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - the last safety net: content never fails a stage task
            why = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            log.warning("a block of %d rows could not be staged; its rows are rejected as unreadable: %s",
                        raw.num_rows, why)
            staged = _unreadable(raw, why)
        name = self._block_name(raw)
        for sh, part in staged.parts:
            self.storage.write_parquet(
                self.storage.path(TMP, self.run_id, STAGED_ACCEPTED, f"{SHARD}={sh}", f"{name}.parquet"), part)
        if staged.rejects.num_rows:
            self.storage.write_parquet(self.storage.path(TMP, self.run_id, STAGED_REJECTS, f"{name}.parquet"),
                                       staged.rejects)
        return pa.table({k: [v] for k, v in staged.counts.items()})

    def _split(self, raw: pa.Table) -> _Staged:
        """Validate, pseudonymise and shard one block, ready to write."""
        accepted, rejected = validate(raw, self.rules, self.now_ms)
        user_key, shard = user_keys_of(accepted, self.key, self.shards, skip_replaced=False)
        accepted = accepted.drop_columns([s.USER_ID, s.USER_KEY]).add_column(0, s.USER_KEY, user_key)
        rejected_key, _ = user_keys_of(rejected, self.key, self.shards)
        rejected = rejected.drop_columns([s.USER_ID, s.USER_KEY]).add_column(4, s.USER_KEY, rejected_key)
        if len(self.tombstones):
            deleted = pc.is_in(accepted.column(s.USER_KEY), value_set=self.tombstones)
            gone = accepted.filter(deleted)
            accepted, shard = accepted.filter(pc.invert(deleted)), shard.filter(pc.invert(deleted))
            rejected = pa.concat_tables([rejected, _as_deleted(gone)])
        parts = []
        if accepted.num_rows:
            accepted = accepted.append_column(SHARD, shard)
            for sh in np.unique(shard.to_numpy()):
                part = accepted.filter(pc.equal(accepted.column(SHARD), int(sh))).drop_columns([SHARD])
                parts.append((int(sh), part))
            accepted = accepted.drop_columns([SHARD])
        rejects = rejected.select(s.REJECT_SCHEMA.names).cast(s.REJECT_SCHEMA)
        train = accepted.filter(pc.equal(accepted.column(s.SPLIT), "train"))
        ts = train.column(s.TS).cast(pa.int64())
        by_reason = pc.value_counts(rejected.column(s.REASON)).to_pylist() if rejected.num_rows else []
        return _Staged(parts, rejects, {
            "rows": raw.num_rows,
            "accepted": accepted.num_rows,
            "rejected": rejected.num_rows,
            "by_reason": json.dumps({d["values"]: d["counts"] for d in by_reason}),
            "min_ts": pc.min(ts).as_py() if len(ts) else None,
            "max_ts": pc.max(ts).as_py() if len(ts) else None,
        })

    @staticmethod
    def _block_name(raw: pa.Table) -> str:
        # Deterministic per block, so a retried task overwrites its own files instead of adding copies.
        try:
            first = raw.slice(0, 1).to_pylist()[0] if raw.num_rows else {}
            lines = raw.column(s.LINE)
            ident = f"{first.get(s.SOURCE)}|{pc.min(lines)}|{pc.max(lines)}|{raw.num_rows}|{first.get(s.ITEM_ID)}"
        except Exception:  # noqa: BLE001 - a value that is not text (the block is being rejected as unreadable)
            digest = hashlib.sha1()  # its bytes, then: as deterministic, and as unique
            for column in raw.columns:
                for chunk in column.chunks:
                    for buf in chunk.buffers():
                        if buf is not None:
                            digest.update(buf)
            ident = f"{raw.num_rows}|{digest.hexdigest()}"
        return hashlib.sha1(ident.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _unreadable(raw: pa.Table, why: str) -> _Staged:
    """Every row of a block rejected as unreadable, keeping only its source and line: nothing else of it can be
    trusted to be text, and its raw user id must not reach disk."""
    n = raw.num_rows
    provenance = {}
    for name, type_ in ((s.SOURCE, pa.string()), (s.LINE, pa.int64())):
        try:
            provenance[name] = raw.column(name).combine_chunks().cast(type_)
            provenance[name].validate(full=True)
        except Exception:  # noqa: BLE001
            provenance[name] = pa.nulls(n, type_)
    rejects = pa.table({
        f.name: provenance[f.name] if f.name in provenance else pa.nulls(n, f.type) for f in s.REJECT_SCHEMA
    }, schema=s.REJECT_SCHEMA)
    rejects = rejects.set_column(0, s.REASON, pa.array([Reason.UNREADABLE] * n, pa.string()))
    rejects = rejects.set_column(1, s.DETAIL, pa.array([why] * n, pa.string()))
    counts = {"rows": n, "accepted": 0, "rejected": n, "by_reason": json.dumps({Reason.UNREADABLE: n} if n else {}),
              "min_ts": None, "max_ts": None}
    return _Staged([], rejects, counts)


def _as_deleted(accepted: pa.Table) -> pa.Table:
    """Rejects for events of deleted users: where they came from, and nothing of the user or the event, so no
    file written after a deletion holds the user's key or events (the tombstone refuses them, as the count says)."""
    n = accepted.num_rows
    null = pa.nulls(n, pa.string())
    return pa.table({
        s.REASON: pa.array([Reason.DELETED_USER] * n, pa.string()),
        s.DETAIL: null,
        s.SOURCE: accepted.column(s.SOURCE),
        s.LINE: accepted.column(s.LINE),
        **{c: null for c in (s.USER_KEY, s.ITEM_ID, s.EVENT, s.TS, s.CATEGORY_ID, s.BRAND_ID, s.PRICE)},
    })


def now_ms() -> int:
    return int(time.time() * 1000)
