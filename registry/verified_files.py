"""Local files this process has hashed and found as their manifest says, so that one unchanged since is not read
again: an update job re-verified its parent every cycle, the version it had itself published (and read back) a
cycle before, which on Taobao was 0.4-0.6 s of a 5-8 s cycle.

"Unchanged" means the same file (device and inode, which a version folder's rename keeps) with the same size,
modification time and change time, as git's index and rsync's quick check decide it. A write through the
filesystem sets the change time to now, and setting the times (`utime`) does too, so a change shows. Timestamps come
from a coarse clock, though: a write in the same tick as the file's last change could leave its stat as it was. So
a file is remembered only if its last change came well before its hash began (git's "racily clean" entries), with a
2 s margin where the filesystem keeps whole seconds; or if this process wrote it where no other writer looks (a
publisher's own staging folder, read back at once).

What a stat cannot show, and the memo therefore trusts: damage below the filesystem (a bad block under an unchanged
inode), a clock set back by root, and writes through a shared mapping not yet written back. The memo is used only on
local disk filesystems that keep their own attributes (`LOCAL_TYPES`): a network filesystem's client can serve a
stale stat for a minute after another client changed the file, and an object store has no inodes (its readers hash
what they copy anyway).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import NamedTuple

MARGIN_NS = 100_000_000  # far above the kernel's timestamp tick (1-10 ms)
COARSE_MARGIN_NS = 2_000_000_000  # where the filesystem keeps whole seconds (ext4 with small inodes, ext3, FAT)
MAX_FILES = 4096  # a few hundred versions' worth; the least recently used are forgotten first
LOCAL_TYPES = frozenset({"ext4", "ext3", "xfs", "btrfs", "f2fs", "tmpfs", "zfs", "bcachefs"})


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


def filesystem_type(dev: int) -> str | None:
    """The type of the filesystem mounted from device `dev` (`/proc/self/mountinfo`), or None where it is not
    known (not Linux, or not found)."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == want and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        return None
    return None


class VerifiedFiles:
    """(device, inode) -> the stamp and sha256 a file had when it was hashed. Thread-safe: a version's files are
    hashed side by side."""

    def __init__(self, max_files: int = MAX_FILES) -> None:
        self._max = max_files
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[int, int], tuple[Stamp, str]] = OrderedDict()
        self._local: dict[int, bool] = {}  # device -> a filesystem in LOCAL_TYPES

    def holds(self, now: Stamp | None, sha: str) -> bool:
        """True if the file, stamped `now`, was hashed to `sha` and has not changed since."""
        if now is None:
            return False
        with self._lock:
            key = (now.dev, now.ino)
            if self._seen.get(key) != (now, sha):
                return False
            self._seen.move_to_end(key)
            return True

    def remember(self, before: Stamp | None, after: Stamp | None, sha: str, hash_started_ns: int,
                 written_here: bool = False) -> None:
        """Record a file that hashed to `sha`: only if its stamp did not move while it was read (`before`, `after`),
        its filesystem is a local disk's, and its last change came well before the hash began or this process
        wrote it where no other writer looks (`written_here`)."""
        if before is None or before != after or not self._is_local(before.dev):
            return
        changed = max(before.mtime_ns, before.ctime_ns)
        whole_seconds = before.mtime_ns % 1_000_000_000 == 0 and before.ctime_ns % 1_000_000_000 == 0
        margin = COARSE_MARGIN_NS if whole_seconds else MARGIN_NS
        if not written_here and changed > hash_started_ns - margin:
            return
        with self._lock:
            key = (before.dev, before.ino)
            self._seen[key] = (before, sha)
            self._seen.move_to_end(key)
            while len(self._seen) > self._max:
                self._seen.popitem(last=False)

    def remembers_on(self, dev: int) -> bool:
        """Whether files on device `dev` are remembered at all (a local disk's filesystem)."""
        return self._is_local(dev)

    def forget_all(self) -> None:
        with self._lock:
            self._seen.clear()

    def _is_local(self, dev: int) -> bool:
        local = self._local.get(dev)
        if local is None:
            local = self._local[dev] = filesystem_type(dev) in LOCAL_TYPES
        return local


VERIFIED = VerifiedFiles()  # this process's: every verified read of a local version file goes through it
