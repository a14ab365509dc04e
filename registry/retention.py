"""Retention: what the registry removes. Staging folders of publishers that died mid-write; versions past the
retention count; older versions that still hold a deleted user."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.storage import CHECKPOINTS, Storage
from registry.format import MANIFEST, STAGING_PREFIX, USER_KEY, USERS, CheckpointError, version_number
from registry.reader import latest_version, list_versions, version_folder


def remove_stale_staging(storage: Storage, older_than_s: float = 24 * 3600) -> int:
    """Delete staging folders left by crashed publishers, untouched for older_than_s; returns how many."""
    now = time.time()
    removed = 0
    entries = storage.fs.get_file_info(pafs.FileSelector(storage.path(CHECKPOINTS), allow_not_found=True))
    for entry in entries:
        if not entry.base_name.startswith(STAGING_PREFIX):
            continue
        infos = storage.fs.get_file_info(pafs.FileSelector(entry.path, recursive=True, allow_not_found=True))
        times = [i.mtime.timestamp() for i in [entry, *infos] if i.mtime is not None]
        if times and now - max(times) > older_than_s:
            storage.delete(entry.path)
            removed += 1
    return removed


def _holds_any(storage: Storage, folder: str, keys: pa.Array) -> bool:
    try:
        users = pq.read_table(f"{folder}/{USERS}", columns=[USER_KEY], filesystem=storage.fs)[USER_KEY]
    except (OSError, pa.ArrowInvalid):
        return True  # unreadable: it cannot serve, and it cannot be shown free of deleted users
    return bool(pc.any(pc.is_in(users, value_set=keys)).as_py())


def prune(storage: Storage, keep: int, holding: set[str] | None = None) -> list[str]:
    """Keep the version LATEST names and the `keep - 1` versions before it; remove older ones, and any version
    before LATEST whose users include a key of `holding` (deleted users: once the newest version is without them,
    no older one may keep them). Versions newer than LATEST (a publish in flight) stay. Returns those removed."""
    try:
        latest = latest_version(storage)
    except CheckpointError:
        return []  # a damaged LATEST: nothing is removed until a publish repairs it
    if latest is None:
        return []
    older = [v for v in list_versions(storage) if version_number(v) < version_number(latest)]
    kept = set(older[len(older) - (keep - 1):]) if keep > 1 else set()
    keys = pa.array(sorted(holding or ()), pa.string())
    removed = []
    for version in older:
        folder = version_folder(storage, version)
        if version in kept and not (len(keys) and _holds_any(storage, folder, keys)):
            continue
        storage.delete(f"{folder}/{MANIFEST}")  # readers skip a folder without a manifest from this moment
        storage.delete(folder)
        removed.append(version)
    return removed
