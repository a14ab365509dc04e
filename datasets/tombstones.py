"""Deletions (DELETE /users): one small tombstone file per deleted user under state/tombstones/.

The live API writes them; ingestion reads them to purge the user's rows and refuse their later events; publishing
reads them to blank the user's row in every later version.
"""

from __future__ import annotations

import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc

from core.storage import STATE, Storage

TOMBSTONES = "tombstones"  # one small file per deletion, so concurrent replicas never rewrite a shared file


def add_tombstone(storage: Storage, user_key: str) -> str:
    """Record a deletion durably; the next ingestion purges the user's rows and drops their new events."""
    name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex}.parquet"
    path = storage.path(STATE, TOMBSTONES, name)
    storage.write_parquet(path, pa.table({"user_key": [user_key], "deleted_at_ms": [int(time.time() * 1000)]}),
                          durable=True)
    return path


def load_tombstones(storage: Storage) -> pa.Array:
    """Every deleted user's key."""
    files = storage.list_files(STATE, TOMBSTONES, suffix=".parquet")
    if not files:
        return pa.array([], pa.string())
    return pc.unique(storage.read_parquet(files, columns=["user_key"]).column("user_key").combine_chunks())


def tombstone_files(storage: Storage) -> dict[str, str]:
    """Tombstone file name -> the deleted user's key."""
    out = {}
    for path in storage.list_files(STATE, TOMBSTONES, suffix=".parquet"):
        for key in storage.read_parquet([path], columns=["user_key"]).column("user_key").to_pylist():
            out[path.rsplit("/", 1)[-1]] = key
    return out
