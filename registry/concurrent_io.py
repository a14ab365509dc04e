"""Running a version's independent file jobs (encode or hash whole files) side by side.

A version is about a dozen files, three of them table-sized (at 1,024 dimensions each copy of the item vectors of
a 55k-item catalogue is 200 MB). Hashing, Parquet encoding, torch.save and disk writes all release the GIL, so
threads write or verify several files at once: a Taobao-sized publish encoded them one after another.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# More threads than this only contend for memory bandwidth: every job streams a table through memory once.
MAX_THREADS = 4


def threads() -> int:
    """Threads for a version's file jobs: one per core, at most MAX_THREADS."""
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def run_all(jobs: Sequence[Callable[[], T]], workers: int | None = None) -> list[T]:
    """Every job's result, in order. All jobs run to the end even when one fails (none is left writing into a
    folder its caller is about to delete); then the first failure, in job order, is raised."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=min(workers or threads(), len(jobs)),
                            thread_name_prefix="registry-io") as pool:
        futures = [pool.submit(job) for job in jobs]
        errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err
    return [f.result() for f in futures]
