"""Forgetting users: the stored rows of tombstoned users (DELETE /users) are removed from every file that holds them.

Runs at the start of an ingestion that finds tombstones it has not applied yet. It removes their rows from
interactions/, holdout/, rejects/ and the audience exports under audiences/, from the live files under raw/live/ and
the event files dropped under raw/, and blanks their keys in the user id map (the index stays, so no other user's
index moves). Each file is rewritten atomically without those rows, so an interrupted purge leaves whole files and
the next ingestion purges again.
Published versions are the registry's: a version without the users is published and the older ones retired
(trainers.publish). What a purge cannot reach is said in the README's privacy section.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from core.storage import AUDIENCES, HOLDOUT, IDMAPS, INTERACTIONS, RAW, REJECTS, TRAIN_RUNS, Storage
from datasets import schema as s
from datasets.pseudonym import pseudonymise, shard_of_keys
from datasets.stage import SHARD

log = logging.getLogger("datasets.deletion")
STALE_RUN_S = 24 * 3600  # a Ray Train run folder untouched this long belongs to a run that died


@dataclass
class Purged:
    rows: int = 0
    rewritten: dict[str, tuple[int, int]] = field(default_factory=dict)  # raw/ file -> new (size, mtime_ns)


def _without(storage: Storage, path: str, keys: pa.Array, column: str = s.USER_KEY) -> int:
    table = storage.read_parquet([path])
    if column not in table.column_names:
        return 0
    hit = pc.fill_null(pc.is_in(table.column(column), value_set=keys), False)
    removed = int(pc.sum(hit).as_py() or 0)
    if removed:
        storage.write_parquet(path, table.filter(pc.invert(hit)), durable=True)
    return removed


def _blank_idmap(storage: Storage, keys: pa.Array) -> int:
    """Null the deleted users' keys in the user id map; their indices stay taken (indices never move)."""
    blanked = 0
    for path in storage.list_files(IDMAPS, "user", suffix=".parquet"):
        table = storage.read_parquet([path])
        hit = pc.fill_null(pc.is_in(table.column(s.KEY), value_set=keys), False)
        n = int(pc.sum(hit).as_py() or 0)
        if n:
            key = pc.if_else(hit, pa.scalar(None, pa.string()), table.column(s.KEY))
            storage.write_parquet(path, table.set_column(0, s.KEY, key), durable=True)
            blanked += n
    return blanked


def _raw_lines(data: bytes, keep_line) -> tuple[bytes, int]:
    out, removed = [], 0
    for line in data.splitlines(keepends=True):
        if keep_line(line):
            out.append(line)
        else:
            removed += 1
    return b"".join(out), removed


def _purge_raw_file(storage: Storage, path: str, keys: set[str], secret: bytes, user_column: str,
                    delimiter: str) -> int:
    """Rows of deleted users out of an event file dropped under raw/ (CSV with a header, JSONL or Parquet), which
    still holds raw ids: each row's id is pseudonymised to compare."""
    def deleted(raw_id: object, key: object = None) -> bool:
        if isinstance(key, str) and key in keys:
            return True
        return isinstance(raw_id, str) and bool(raw_id.strip()) and pseudonymise(raw_id.strip(), secret) in keys

    if path.endswith(".parquet"):
        table = storage.read_parquet([path])
        ids = table.column(user_column).to_pylist() if user_column in table.column_names else [None] * len(table)
        given = table.column(s.USER_KEY).to_pylist() if s.USER_KEY in table.column_names else [None] * len(table)
        drop = pa.array([deleted(i, k) for i, k in zip(ids, given, strict=True)], pa.bool_())
        removed = int(pc.sum(drop).as_py() or 0)
        if removed:
            storage.write_parquet(path, table.filter(pc.invert(drop)), durable=True)
        return removed
    data = storage.read_bytes(path)
    if path.endswith((".jsonl", ".json", ".ndjson")):
        def keep(line: bytes) -> bool:
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                return True  # not a row anyone could read: it was rejected, and names no readable user
            return not (isinstance(obj, dict) and deleted(obj.get(user_column), obj.get(s.USER_KEY)))
    else:
        header = next(csv.reader([data.split(b"\n", 1)[0].decode("utf-8", "replace")], delimiter=delimiter), [])
        position = header.index(user_column) if user_column in header else -1
        first = True

        def keep(line: bytes) -> bool:
            nonlocal first
            if first or position < 0:
                first = False
                return True
            try:
                fields = next(csv.reader(io.StringIO(line.decode("utf-8")), delimiter=delimiter), [])
            except (UnicodeDecodeError, csv.Error):
                return True
            return not (len(fields) > position and deleted(fields[position]))
    kept, removed = _raw_lines(data, keep)
    if removed:
        storage.write_bytes_atomic(path, kept)
    return removed


def _remove_stale_train_runs(storage: Storage) -> int:
    """Run folders of Ray Train runs that died (finished runs remove their own): they hold model states."""
    now, removed = time.time(), 0
    entries = storage.fs.get_file_info(pafs.FileSelector(storage.path(TRAIN_RUNS), allow_not_found=True))
    for entry in entries:
        infos = storage.fs.get_file_info(pafs.FileSelector(entry.path, recursive=True, allow_not_found=True))
        times = [i.mtime.timestamp() for i in [entry, *infos] if i.mtime is not None]
        if entry.type == pafs.FileType.Directory and times and now - max(times) > STALE_RUN_S:
            storage.delete(entry.path)
            removed += 1
    return removed


def purge_users(storage: Storage, user_keys: list[str], shards: int, secret: bytes, user_column: str = s.USER_ID,
                delimiter: str = ",") -> Purged:
    """Remove these users' rows everywhere ingestion stored them; returns the rows removed and the raw/ files
    rewritten (their new size and mtime, so ingestion does not take them for changed inputs)."""
    out = Purged()
    if not user_keys:
        return out
    keys = pa.array(sorted(user_keys), pa.string())
    paths = []
    for shard in sorted(set(shard_of_keys(user_keys, shards).tolist())):  # users live in one shard each
        for folder in (INTERACTIONS, HOLDOUT):
            paths += storage.list_files(folder, f"{SHARD}={shard}", suffix=".parquet")
    paths += storage.list_files(REJECTS, suffix=".parquet")
    # Audience exports keep their ranks: a gap is where a deleted shopper was (the campaign list just shortens).
    paths += storage.list_files(AUDIENCES, suffix=".parquet")
    out.rows = sum(_without(storage, p, keys) for p in paths)
    key_set = set(user_keys)
    for path in storage.list_files(RAW):
        if ".tmp-" in path.rsplit("/", 1)[-1]:
            continue  # a write in progress; the live API refuses deleted users before it writes
        removed = _purge_raw_file(storage, path, key_set, secret, user_column, delimiter)
        if removed:
            out.rows += removed
            info = storage.fs.get_file_info(path)
            display = path if storage.is_local else f"s3://{path}"
            out.rewritten[display] = (info.size, info.mtime_ns or 0)
    _blank_idmap(storage, keys)
    _remove_stale_train_runs(storage)
    return out
