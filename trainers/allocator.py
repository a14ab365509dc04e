"""The memory allocator the training workers start with.

A step at 1M users allocates about 3 GB of row tensors (the rows it reads, their gradient, the rows exchanged with
the other ranks, their Adam moments) and frees them at its end. glibc serves every block over 32 MB from a fresh
mmap and unmaps it on free, so each step's 3 GB fault in again, zeroed: half of a 2-worker step's CPU time went to
the kernel. Keeping glibc's freed blocks (no mmap, no trim) removed the faults but never gave the memory back, and
two workers passed Ray's memory limit at a refresh. jemalloc reuses a freed block in the next step and gives pages
back after they stay unused for a while (its decay, 10 s by default); `oversize_threshold:0` keeps large blocks in
that regime (above 8 MB they would otherwise go to an arena that gives them back at once, which is glibc's cost).
Measured again on 2026-12-07 (jemalloc 5.3, a process that frees its blocks and asks for them again): blocks of
8-245 MB were faulted in again every time under this setting, as under decays of 30 s to 1,000 s; only a decay of -1
kept them. Resident update workers with -1 faulted 2,000-20,000 pages a Taobao cycle instead of 60,000-170,000, but
their cycles were no faster in bench.warm_start, so nothing here changed (README, "Warm start against full retrain").

The library is preloaded into the Ray Train workers only (`RunConfig(worker_runtime_env=...)`). Where the machine
has no jemalloc, the workers run on the system allocator, slower and otherwise the same.
"""

from __future__ import annotations

import ctypes.util
import os
from typing import Literal

JEMALLOC_CONF = "oversize_threshold:0"


def find_jemalloc() -> str | None:
    """The jemalloc shared library's name as the dynamic loader finds it (Debian: libjemalloc2), or None."""
    return ctypes.util.find_library("jemalloc")


def worker_env(allocator: Literal["jemalloc", "system"], library: str | None = None) -> dict[str, str]:
    """Environment variables for a training worker's process (empty: the system allocator)."""
    if allocator == "system":
        return {}
    library = library or find_jemalloc()
    if library is None:
        return {}
    preload = " ".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    return {"LD_PRELOAD": preload, "MALLOC_CONF": JEMALLOC_CONF}


def in_use() -> Literal["jemalloc", "system"]:
    """The allocator this process runs on, from its mapped libraries (how a test tells what a Ray worker got)."""
    with open("/proc/self/maps") as maps:
        return "jemalloc" if any("libjemalloc" in line for line in maps) else "system"
