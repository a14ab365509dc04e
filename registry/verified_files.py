"""Local files this process has hashed and found as their manifest says, so that one unchanged since is not read
again: an update job re-verified its parent every cycle, the version it had itself published (and read back) a
cycle before, which on Taobao was 0.4-0.6 s of a 5-8 s cycle.

"Unchanged" means the same file (device and inode, which a version folder's rename keeps) with the same size,
modification time and change time. No writer can set a change time back (setting the times sets it to now), so
any write through the filesystem shows. Timestamps come from a coarse clock, though: a write in the same tick as
the file's last change could leave its stat as it was. So a file is remembered only if its last change came well
before its hash began (git's "racily clean" entries are the same problem).

Only local disk: an object store has no inodes, and its readers hash what they copy anyway.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import NamedTuple

# Far above any kernel timestamp granularity (a jiffy: 1-10 ms).
MARGIN_NS = 100_000_000
MAX_FILES = 4096  # a few hundred versions' worth; the oldest are forgotten first


class Stamp(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


def stamp(path: str) -> Stamp | None:
    """The file's identity and stat, or None when it cannot be read (its check then says why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class VerifiedFiles:
    """(device, inode) -> the stamp and sha256 a file had when it was hashed. Thread-safe: a version's files are
    hashed side by side."""

    def __init__(self, max_files: int = MAX_FILES) -> None:
        self._max = max_files
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[int, int], tuple[Stamp, str]] = OrderedDict()

    def holds(self, now: Stamp | None, sha: str) -> bool:
        """True if the file, stamped `now`, was hashed to `sha` and has not changed since."""
        if now is None:
            return False
        with self._lock:
            return self._seen.get((now.dev, now.ino)) == (now, sha)

    def remember(self, before: Stamp | None, after: Stamp | None, sha: str, hash_started_ns: int,
                 written_here: bool = False) -> None:
        """Record a file that hashed to `sha`: only if its stamp did not move while it was read (`before`, `after`)
        and its last change came well before the hash began, or this process wrote it where no other writer looks
        (a publisher's own staging folder, read back as soon as it is written: the margin is for another writer's
        change in the same clock tick)."""
        if before is None or before != after:
            return
        if not written_here and max(before.mtime_ns, before.ctime_ns) > hash_started_ns - MARGIN_NS:
            return
        with self._lock:
            key = (before.dev, before.ino)
            self._seen[key] = (before, sha)
            self._seen.move_to_end(key)
            while len(self._seen) > self._max:
                self._seen.popitem(last=False)

    def forget_all(self) -> None:
        with self._lock:
            self._seen.clear()


VERIFIED = VerifiedFiles()  # this process's: every verified read of a local version file goes through it
