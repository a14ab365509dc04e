"""Retention: what the registry removes. Staging folders of publishers that died mid-write."""

from __future__ import annotations

import time

import pyarrow.fs as pafs

from core.storage import CHECKPOINTS, Storage
from registry.format import STAGING_PREFIX


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
