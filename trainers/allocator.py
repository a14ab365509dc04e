"""The memory allocator the training workers start with.

A step at 1M users allocates about 3 GB of row tensors (the rows it reads, their gradient, the rows exchanged with
the other ranks, their Adam moments) and frees them at its end. glibc serves every block over 32 MB from a fresh
mmap and unmaps it on free, so each step's 3 GB fault in again, zeroed: half of a 2-worker step's CPU time went to
the kernel. Keeping glibc's freed blocks (no mmap, no trim) removed the faults but never gave the memory back, and
two workers passed Ray's memory limit at a refresh. jemalloc reuses a freed block in the next step and gives pages
back after they stay unused for a while (its decay, 10 s by default); `oversize_threshold:0` keeps large blocks in
that regime (above 8 MB they would otherwise go to an arena that gives them back at once, which is glibc's cost).

Table-sized blocks are given back at once all the same: freed, then asked for again, 8 MB to 1 GB of them faulted in
again every time here (jemalloc 5.3), unless the decay is off (-1). The resident update workers run with it off
(`retain`): a Taobao cycle's 60,000-170,000 page faults a rank (0.3-1.1 s of kernel time) fell to 2,000-20,000.
They give their unused pages back when they wait for a cycle (`purge`). Full trainings keep the decay: nothing has
measured what holding every freed page would do to their peak at a million shoppers (16 GiB of 24 today).

The library is preloaded into the Ray Train workers only (`RunConfig(worker_runtime_env=...)`). Where the machine
has no jemalloc, the workers run on the system allocator, slower and otherwise the same.
"""

from __future__ import annotations

import ctypes.util
import os
from typing import Literal

JEMALLOC_CONF = "oversize_threshold:0"
# The resident update workers' setting: what they free stays theirs until `purge`.
RETAINING_CONF = JEMALLOC_CONF + ",dirty_decay_ms:-1,muzzy_decay_ms:-1"
_ALL_ARENAS = 4096  # MALLCTL_ARENAS_ALL


def find_jemalloc() -> str | None:
    """The jemalloc shared library's name as the dynamic loader finds it (Debian: libjemalloc2), or None."""
    return ctypes.util.find_library("jemalloc")


def worker_env(allocator: Literal["jemalloc", "system"], library: str | None = None,
               retain: bool = False) -> dict[str, str]:
    """Environment variables for a training worker's process (empty: the system allocator). `retain`: freed pages
    stay the process's until `purge` (resident update workers)."""
    if allocator == "system":
        return {}
    library = library or find_jemalloc()
    if library is None:
        return {}
    preload = " ".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    return {"LD_PRELOAD": preload, "MALLOC_CONF": RETAINING_CONF if retain else JEMALLOC_CONF}


def retains() -> bool:
    """This process runs on jemalloc with the decay off (`worker_env(retain=True)`)."""
    return in_use() == "jemalloc" and os.environ.get("MALLOC_CONF") == RETAINING_CONF


def purge() -> bool:
    """Give every page jemalloc holds unused back to the system (a retaining worker that waits for work); False
    where this process does not run on jemalloc."""
    if in_use() != "jemalloc":
        return False
    mallctl = ctypes.CDLL(None).mallctl  # the preloaded library's
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return mallctl(f"arena.{_ALL_ARENAS}.purge".encode(), None, None, None, 0) == 0


def in_use() -> Literal["jemalloc", "system"]:
    """The allocator this process runs on, from its mapped libraries (how a test tells what a Ray worker got)."""
    with open("/proc/self/maps") as maps:
        return "jemalloc" if any("libjemalloc" in line for line in maps) else "system"
